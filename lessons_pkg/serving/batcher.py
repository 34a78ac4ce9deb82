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

The engine calls ``callback(step, new_tokens)`` after each token on rank 0:
that is where streamed tokens go out to their clients, and where the
prompts of a client that disconnected are cancelled, without the other ranks
doing anything but following the engine's own per-step broadcast.
"""
from __future__ import annotations

import collections
import threading
import time

from lessons_pkg.serving.control import ControlChannel, WorkItem
from lessons_pkg.serving.follower import describe, run_item
from lessons_pkg.serving.schema import GenerateRequest


class Job:
    """One HTTP request in flight: its prompts, its stream of tokens, its answer."""

    def __init__(self, request: GenerateRequest, stream: bool = False):
        self.request = request
        self.stream = stream
        self.events: collections.deque = collections.deque()   # ("token", prompt index, token id)
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
    if len(tokens) <= keep:
        return {"text": out["text"][index], "segments": list(out["segments"][index]), "tokens": tokens,
                "logprobs": None if logprobs is None else list(logprobs)}
    return {"text": None, "segments": list(out["segments"][index][:keep]), "tokens": tokens[:keep],
            "logprobs": None if logprobs is None else list(logprobs[:keep - 1])}


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

    spans, wants, counts, start = [], [], [], 0
    for job in batch:
        n = len(job.request.prompts)
        spans.append((job, start, start + n))
        wants += [job.wants] * n
        counts += [0] * n
        start += n

    def callback(step: int, new_tokens) -> set[int] | None:
        cancel = set()
        for job, a, b in spans:
            if job.cancelled:
                cancel.update(range(a, b))
                continue
            for i in range(a, b):
                token = new_tokens[i]
                if token is None:
                    continue
                counts[i] += 1
                if job.stream and counts[i] <= wants[i]:
                    job.push(("token", i - a, int(token)))
                if counts[i] >= wants[i] or (i - a) in job.finished:
                    cancel.add(i)
        return cancel or None

    def safe_callback(step, new_tokens):
        try:
            return callback(step, new_tokens)
        except Exception:  # never let bookkeeping on rank 0 break the ranks' lock-step
            return None

    channel.send(item)
    error, out = None, None
    try:
        out = run_item(engine, item, callback=safe_callback)
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
            "tokens": [p["tokens"] for p in parts]})
