"""The HTTP side, on the serving rank only: Flask routes that validate, queue and answer.

    PUT  /api               Megatron's interface: {"prompts": [...], "tokens_to_generate": 1, ...}
    POST /v1/completions    OpenAI's (legacy) completions, ``stream: true`` for server-sent events
    GET  /v1/models         the one model served
    GET  /health            {"status": "ok", ...} once the model is loaded
    GET  /                  the web page (static/index.html)

A route never touches the model: it validates the request (400 on any
problem, before the other ranks hear of it), puts a :class:`Job` in the queue
and waits for the serving loop to answer it. Errors are JSON ``{"message": ...}``
with the status that fits (400 bad request, 404/405, 499 client gone,
500 generation failed, 503 shutting down); OpenAI routes add OpenAI's
``{"error": {...}}`` beside it.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

from lessons_pkg.inference.tokenization import TokenText
from lessons_pkg.serving import completions as oai
from lessons_pkg.serving.batcher import Job, RequestQueue
from lessons_pkg.serving.schema import BadRequest, parse_api_request, parse_completion_request, parse_json

STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass
class ServingState:
    queue: RequestQueue
    tokenizer: object
    max_positions: int
    model_name: str
    info: dict = field(default_factory=dict)      # shown by /health
    request_timeout_s: float = 600.0
    params_cls: type | None = None                # the engine's SamplingParams: its own validate() runs here too
    api_defaults: dict = field(default_factory=dict)  # PUT /api fields a request may omit (the server's flags)
    max_new_tokens: int | None = None             # --out-seq-length: the most tokens one request may generate

    def submit(self, req, stream: bool = False) -> Job:
        """Check ``req`` with the engine's own rules too (400, never a collective), then queue it."""
        wants = req.sampling["tokens_to_generate"]
        if self.max_new_tokens is not None and wants > self.max_new_tokens:
            raise BadRequest(f"tokens_to_generate ({wants}) is more than this server's --out-seq-length "
                             f"({self.max_new_tokens})", "tokens_to_generate")
        if self.params_cls is not None and req.beam_width is None and hasattr(self.params_cls, "validate"):
            try:
                self.params_cls(**req.sampling).validate(self.max_positions, req.prompt_lengths)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        job = Job(req, stream=stream)
        self.queue.submit(job)
        return job


def _error(status: int, message: str, openai: bool = False, param: str | None = None):
    body = {"message": message}
    if openai:
        kind = "invalid_request_error" if status in (400, 404) else "server_error"
        body["error"] = {"message": message, "type": kind, "param": param, "code": status}
    return jsonify(body), status


def _wait(job: Job, state: ServingState):
    if not job.wait(state.request_timeout_s):
        job.cancel()
        return (504, f"no answer within {state.request_timeout_s:.0f} s")
    return job.error


def create_app(state: ServingState) -> Flask:
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024   # a larger body is answered 413, not read
    tok = state.tokenizer
    segment = TokenText(tok).segment           # any token id's text (top_logprobs)

    @app.errorhandler(BadRequest)
    def bad_request(e: BadRequest):
        return _error(400, str(e), request.path.startswith("/v1/"), e.param)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return _error(e.code or 500, f"{e.name}: {e.description}", request.path.startswith("/v1/"))

    @app.errorhandler(Exception)
    def internal_error(e: Exception):
        return _error(500, f"internal error: {type(e).__name__}: {e}", request.path.startswith("/v1/"))

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model=state.model_name, queued=len(state.queue),
                       max_position_embeddings=state.max_positions, **state.info)

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[{"id": state.model_name, "object": "model", "owned_by": "lessons-pkg",
                                             "created": int(state.info.get("started", time.time())),
                                             "max_model_len": state.max_positions}])

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        if model_id != state.model_name:
            return _error(404, f"The model '{model_id}' does not exist; this server serves '{state.model_name}'",
                          openai=True, param="model")
        return jsonify(id=state.model_name, object="model", owned_by="lessons-pkg",
                       created=int(state.info.get("started", time.time())))

    @app.route("/v1/chat/completions", methods=["GET", "POST"])
    def chat_completions():
        return _error(404, f"'{state.model_name}' is a base (completion) model with no chat template: this server "
                      "has no /v1/chat/completions; send a prompt to /v1/completions", openai=True)

    @app.put("/api")
    def api():
        req = parse_api_request(parse_json(request.get_data()), tok, state.max_positions, state.api_defaults)
        if not req.no_log:
            print(f"request IP: {request.remote_addr} prompts: {len(req.prompts)} "
                  f"tokens_to_generate: {req.sampling['tokens_to_generate']} start time: {datetime.datetime.now()}",
                  flush=True)
        job = state.submit(req)
        error = _wait(job, state)
        if error:
            return _error(*error)
        r = job.result
        if req.beam_width is not None:
            return jsonify(text=r["text"], segments=r["segments"], scores=r["scores"])
        return jsonify(text=r["text"], segments=r["segments"], logprobs=r["logprobs"])

    @app.post("/v1/completions")
    def completions():
        c = parse_completion_request(parse_json(request.get_data()), tok, state.max_positions, state.model_name)
        job = state.submit(c.request, stream=c.stream)
        if c.stream:
            return Response(_stream(job, c, state, segment), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        error = _wait(job, state)
        if error:
            return _error(*error, openai=True)
        return jsonify(_whole(job, c, state, segment))

    return app


def _whole(job: Job, c, state: ServingState, segment) -> dict:
    """The whole answer: n choices per prompt (the best of best_of rows), index = prompt * n + j."""
    r, req, tok = job.result, c.request, state.tokenizer
    choices = []
    for p, prompt_text in enumerate(c.prompt_texts):
        rows = list(c.rows(p))
        if c.best_of > c.n:
            scores = [oai.mean_log_prob(r["logprobs"][i], req.prompt_lengths[i]) for i in rows]
            rows = [rows[j] for j in oai.best_rows(scores, c.n)]
        for j, i in enumerate(rows):
            choices.append(oai.choice(
                p * c.n + j, prompt_text, r["tokens"][i], req.prompt_lengths[i], job.wants, tok, req.stop, c.echo,
                segment, r["logprobs"][i] if r["logprobs"] else None,
                r["top_n_logprobs"][i] if r.get("top_n_logprobs") else None, c.logprobs))
    generated = sum(len(oai.generated_part(t, n, tok.eod)[0]) for t, n in zip(r["tokens"], req.prompt_lengths))
    return oai.completion(state.model_name, choices, sum(len(ids) for ids in c.prompt_ids), generated)


def _stream(job: Job, c, state: ServingState, segment):
    """Server-sent events for a streamed completion (one choice per row); a client that goes away cancels its job."""
    req, tok = c.request, state.tokenizer
    cid, created = oai.new_id(), int(time.time())
    rows = range(len(req.prompts))                     # best_of == n when streaming: row i is choice i
    states = [oai.StreamState(req.stop) for _ in rows]
    k = c.logprobs
    builders = [oai.LogProbsBuilder(segment, bool(k)) for _ in rows] if k is not None else None
    echoed = [False for _ in rows]
    extra = {"usage": None} if c.include_usage else {}

    def chunk(index: int, text: str, reason: str | None = None, logprobs=None) -> str:
        return oai.sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}],
                        **extra})

    def prompt_chunk(i: int, log_probs=None, tops=None) -> str:
        """The echo of row i's prompt; with log-probs, its tokens' (the first one's is null)."""
        echoed[i] = True
        ids = c.prompt_ids[i // c.best_of]
        lp = None
        if builders is not None:
            lp = builders[i].build(ids, [None] + list(log_probs), [None] + list(tops or [None] * len(log_probs)))
        return chunk(i, c.prompt_texts[i // c.best_of], logprobs=lp)

    def token_log_probs(i: int, released: list[tuple]):
        if builders is None or not released:
            return None
        return builders[i].build([t for t, _, _ in released], [v for _, v, _ in released], [t for _, _, t in released])

    if builders is not None and not c.echo:            # text_offset counts from the start of the prompt
        for i in rows:
            builders[i].offset = sum(len(segment(t)) for t in c.prompt_ids[i // c.best_of])
    deadline = time.monotonic() + state.request_timeout_s
    try:
        if c.echo and builders is None:
            for i in rows:
                yield prompt_chunk(i)
        while True:
            events, done = job.next_events(timeout=0.5)
            for event in events:
                if event[0] == "prompt":           # before row i's first token (log-probs asked for)
                    if c.echo:
                        yield prompt_chunk(event[1], event[2], event[3])
                    continue
                _, i, token, log_prob, top = event
                st = states[i]
                new = st.add(token, tok, log_prob, top)
                if st.reason is not None:
                    job.finished.add(i)       # the serving loop cancels this prompt at the next token
                released = st.release(new)
                if new or (released and builders is not None):
                    yield chunk(i, new, logprobs=token_log_probs(i, released))
            if done:
                break
            if not events:
                if time.monotonic() > deadline:
                    job.cancel()
                    yield oai.sse({"error": {"message": "no answer in time", "code": 504}})
                    return
                yield ": waiting\n\n"         # an SSE comment: shows a closed connection early
        if job.error:
            status, message = job.error
            yield oai.sse({"message": message, "error": {"message": message, "type": "server_error",
                                                          "code": status}})
        else:
            r = job.result
            for i, st in enumerate(states):
                if c.echo and not echoed[i]:      # no token came (max_tokens=0): the prompt from the answer
                    n = req.prompt_lengths[i]
                    yield prompt_chunk(i, r["logprobs"][i][: n - 1] if builders else None,
                                       r["top_n_logprobs"][i][: n - 1] if builders and k else None)
                rest = st.flush(tok) if st.reason is None else ""
                st.reason = st.reason or ("stop" if len(st.tokens) < job.wants else "length")
                yield chunk(i, rest, st.reason, token_log_probs(i, st.release(rest)))
            if c.include_usage:
                generated = sum(len(oai.generated_part(t, n, tok.eod)[0])
                                for t, n in zip(r["tokens"], req.prompt_lengths))
                yield oai.sse({"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                               "choices": [], "usage": oai.usage(sum(len(ids) for ids in c.prompt_ids), generated)})
        yield oai.sse("[DONE]")
    finally:
        if not job.done:
            job.cancel()
