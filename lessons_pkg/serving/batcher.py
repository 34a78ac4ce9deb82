"""Concurrent requests -> batches: a queue on the serving rank, and the run of one batch.

Megatron's server takes a global lock and generates one request at a time.
Here every HTTP thread puts a :class:`Job` in the :class:`RequestQueue` and
waits; the serving loop takes the oldest job plus every waiting job whose
sampling settings are compatible (up to ``max_batch_size`` prompts) and runs
them as one batch, one forward per token for all of them.

Compatible means "the same engine call can serve both":

* greedy and unseeded sampling requests with equal settings batch together,
  whatever their ``tokens_to_generate``: the batch runs for the longest one and
  each shorter prompt is cancelled (engine callback) as soon as it has its
  tokens, then cut to exactly what it asked for;
* a seeded sampling request (``random_seed``) runs alone, since the random
  draws of a batch depend on who else is in it; beam search runs alone (one
  prompt, Megatron's rule).

The engine calls ``callback(step, new_tokens, step_log_probs)`` after each
token on rank 0: that is where streamed tokens (and their log-probs) go out
to their clients, where a prompt whose text reached one of its stop strings
ends, and where the prompts of a client that disconnected are cancelled,
without the other ranks doing anything but following the engine's own
per-step broadcast.

A streamed job receives events ``("token", prompt, token id, log p, top)``
(log p and top None unless it asked for log-probs) and, before the first
token of a prompt when it asked for log-probs, ``("prompt", prompt, the
prompt's log-probs, their top k)``.
"""
from __future__ import annotations

import collections
import threading
import time

from lessons_pkg.serving.completions import find_stop
from lessons_pkg.serving.control import ControlChannel, WorkItem
from lessons_pkg.serving.follower import describe, run_item
from lessons_pkg.serving.schema import GenerateRequest


class Job:
    """One HTTP request in flight: its prompts, its stream of tokens, its answer."""

    def __init__(self, request: GenerateRequest, stream: bool = False):
        self.request = request
        self.stream = stream
        self.events: collections.deque = collections.deque()   # ("token", ...) and ("prompt", ...): see above
        self.cond = threading.Condition()
        self.result: dict | None = None
        self.error: tuple[int, str] | None = None               # (HTTP status, message)
        self.done = False
        self.cancelled = False          # the client went away: stop generating for it
        self.finished: set[int] = set()  # prompts the client needs no more of (a stop string was seen)
        self.created = time.monotonic()

    @property
    def wants(self) -> int:
        return self.request.sampling["tokens_to_generate"]

    def push(self, event: tuple) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def finish(self, result: dict | None = None, error: tuple[int, str] | None = None) -> None:
        with self.cond:
            self.result, self.error, self.done = result, error, True
            self.cond.notify_all()

    def cancel(self) -> None:
        self.cancelled = True

    def next_events(self, timeout: float = 1.0) -> tuple[list[tuple], bool]:
        """Tokens pushed since the last call, and whether the job is done."""
        with self.cond:
            if not self.events and not self.done:
                self.cond.wait(timeout)
            events = list(self.events)
            self.events.clear()
            return events, self.done

    def wait(self, timeout: float | None = None) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.done, timeout)


def batch_key(request: GenerateRequest):
    """Jobs with equal keys can share one engine call; ``None``: this job runs alone."""
    if request.beam_width is not None:
        return None
    s = dict(request.sampling)
    greedy = s["top_k"] == 1
    if s["random_seed"] >= 0 and not greedy:
        return None
    if greedy:
        s["random_seed"] = -1                    # greedy decoding draws nothing
        if not s["logprobs"]:
            s["temperature"] = 1.0               # argmax(logits / T) = argmax(logits)
    s["tokens_to_generate"] = s["tokens_to_generate"] == 0   # scoring apart from generation
    return tuple(sorted(s.items()))


class RequestQueue:
    """Thread-safe FIFO of jobs; :meth:`next_batch` takes the oldest and the compatible ones after it."""

    def __init__(self, max_batch_size: int):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self.closed:
                job.finish(error=(503, "the server is shutting down"))
                return
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> list[Job]:
        """No more jobs; returns the ones still waiting (to be answered with an error)."""
        with self._cond:
            self.closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            return left

    def next_batch(self, timeout: float) -> list[Job]:
        """The oldest live job and the compatible jobs queued after it; ``[]`` after ``timeout`` s idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft().finish(error=(499, "client closed the request"))
                if self._pending or self.closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            if not self._pending:
                return []
            head = self._pending.popleft()
            batch, size = [head], len(head.request.prompts)
            key = batch_key(head.request)
            if key is not None:
                for job in list(self._pending):
                    if size >= self.max_batch_size:
                        break
                    n = len(job.request.prompts)
                    if not job.cancelled and size + n <= self.max_batch_size and batch_key(job.request) == key:
                        self._pending.remove(job)
                        batch.append(job)
                        size += n
            return batch


def cut(out: dict, index: int, keep: int) -> dict:
    """Prompt ``index`` of an engine answer, cut to its first ``keep`` tokens (prompt + generated)."""
    tokens = list(out["tokens"][index])
    logprobs = out["logprobs"][index] if out.get("logprobs") is not None else None
    top = out["top_n_logprobs"][index] if out.get("top_n_logprobs") is not None else None
    whole = len(tokens) <= keep
    n = len(tokens) if whole else keep
    return {"text": out["text"][index] if whole else None, "segments": list(out["segments"][index][:n]),
            "tokens": tokens[:n], "logprobs": None if logprobs is None else list(logprobs[:n - 1]),
            "top_n_logprobs": None if top is None else list(top[:n - 1])}


class StepCallback:
    """The engine's callback for one batch, on rank 0: count each row's tokens, stream them, say whom to cancel.

    Rows ``a .. b - 1`` of the batch are the prompts of the job of span
    ``(job, a, b)``. After each step a row is cancelled once it has its
    ``tokens_to_generate``, once its text holds one of its stop strings, or
    when its client went away. A streamed job that asked for log-probs gets
    each token's log p and top k from the engine's per-step copy (kept by
    column, as the engine numbers them: entry c is log p of the token in column c + 1).
    """

    def __init__(self, spans: list[tuple[Job, int, int]], tokenizer):
        self.spans, self.tokenizer = spans, tokenizer
        rows = spans[-1][2]
        self.counts = [0] * rows                      # tokens generated per row
        self.generated = [[] for _ in range(rows)]    # rows with stop strings: their tokens so far
        self.log_probs = [[] for _ in range(rows)]    # rows streamed with log-probs: by column - 1
        self.tops = [[] for _ in range(rows)]

    def __call__(self, step: int, new_tokens, step_log_probs=None) -> set[int] | None:
        try:
            return self._step(new_tokens, step_log_probs)
        except Exception:  # never let bookkeeping on rank 0 break the ranks' lock-step
            return None

    def _step(self, new_tokens, step_log_probs) -> set[int] | None:
        cancel = set()
        for job, a, b in self.spans:
            if job.cancelled:
                cancel.update(range(a, b))
                continue
            with_lp = job.stream and job.request.sampling["logprobs"] and step_log_probs is not None
            for i in range(a, b):
                if with_lp:
                    self._keep(i, step_log_probs)
                token = new_tokens[i]
                if token is None:
                    continue
                self.counts[i] += 1
                if self.counts[i] <= job.wants:
                    if job.stream:
                        self._push(job, i - a, i, int(token), with_lp)
                    if self._reached_stop(job, i, int(token)):
                        cancel.add(i)
                if self.counts[i] >= job.wants or (i - a) in job.finished:
                    cancel.add(i)
        return cancel or None

    def _keep(self, i: int, step) -> None:
        """This step's columns ``step.start ..`` of row i."""
        del self.log_probs[i][step.start:], self.tops[i][step.start:]
        self.log_probs[i] += step.values[i]
        self.tops[i] += step.top[i] if step.top is not None else []

    def _push(self, job: Job, prompt: int, i: int, token: int, with_lp: bool) -> None:
        if not with_lp:
            job.push(("token", prompt, token, None, None))
            return
        n = job.request.prompt_lengths[prompt]
        lps, tops = self.log_probs[i], self.tops[i]
        if self.counts[i] == 1:                       # the prompt's log-probs are complete now
            job.push(("prompt", prompt, lps[: n - 1], tops[: n - 1] or None))
        j = n + self.counts[i] - 2                    # the token's column - 1
        job.push(("token", prompt, token, lps[j], tops[j] if tops else None))

    def _reached_stop(self, job: Job, i: int, token: int) -> bool:
        stops = job.request.stop
        if not stops or token == self.tokenizer.eod:
            return False
        self.generated[i].append(token)
        return find_stop(self.tokenizer.detokenize(self.generated[i]), stops) >= 0


def run_batch(batch: list[Job], engine, channel: ControlChannel, params_cls, tokenizer) -> None:
    """Run one batch on all ranks (rank 0 side) and answer each job: its result, or 500 for all of them."""
    first = batch[0].request
    if first.beam_width is not None:
        item = WorkItem("beam", list(first.prompts), beam=dict(
            tokens_to_generate=first.sampling["tokens_to_generate"], beam_width=first.beam_width,
            length_penalty=first.length_penalty, stop_token=first.stop_token,
            add_BOS=first.sampling["add_BOS"],
            prevent_newline_after_colon=first.sampling["prevent_newline_after_colon"]))
    else:
        sampling = dict(first.sampling, tokens_to_generate=max(job.wants for job in batch))
        item = WorkItem("generate", [p for job in batch for p in job.request.prompts], params_cls(**sampling))

    spans, start = [], 0
    for job in batch:
        spans.append((job, start, start + len(job.request.prompts)))
        start += len(job.request.prompts)
    callback = StepCallback(spans, tokenizer)

    channel.send(item)
    error, out = None, None
    try:
        out = run_item(engine, item, callback=callback)
    except Exception as e:
        error = describe(e)
    errors = channel.agree(error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        # the ranks where it happened, not those that only heard of it at the engine's next exchange
        origin = [(rank, e) for rank, e in failed if "see that rank's error" not in e] or failed
        message = "; ".join(f"rank {rank}: {e}" for rank, e in origin)
        for job in batch:
            job.finish(error=(500, f"generation failed: {message}"))
        return
    if item.kind == "beam":
        batch[0].finish(result={"text": out["text"], "segments": out["segments"], "scores": out["scores"]})
        return
    for job, a, b in spans:
        if job.cancelled:
            job.finish(error=(499, "client closed the request"))
            continue
        parts = [cut(out, i, job.request.prompt_lengths[i - a] + job.wants) for i in range(a, b)]
        for part in parts:
            if part["text"] is None:
                part["text"] = tokenizer.detokenize(part["tokens"])
        job.finish(result={
            "text": [p["text"] for p in parts], "segments": [p["segments"] for p in parts],
            "logprobs": [p["logprobs"] for p in parts] if job.request.sampling["logprobs"] else None,
            "top_n_logprobs": [p["top_n_logprobs"] for p in parts] if job.request.sampling["top_n_logprobs"] else None,
            "tokens": [p["tokens"] for p in parts]})
