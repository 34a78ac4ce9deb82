"""A test double of lessons_pkg.inference.InferenceEngine for testing the HTTP/queue layer in one process.

Its "model" is arithmetic: the next token after ``t`` is ``(7 * t + 3) % vocab``
(never the end-of-document token unless ``eod_after`` says so), so every answer
is known without a network and independent of the batch it ran in. Its
"distribution" after ``t`` puts log p = -0.5 - j on ``next_token(t) + j``
(j = 0, 1, ...) and -20 on every other token, so log-probs and the top k are
known too. Like the real engine it walks the columns of a right-padded
batch: a row starts generating at its own prompt length, and rank 0's
callback gets each step's new tokens and log-probs (``StepLogProbs``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from lessons_pkg.inference.engine import StepLogProbs
from lessons_pkg.serving.schema import SAMPLING_DEFAULTS

OTHER = -20.0     # log p of a token outside the fake distribution's top


@dataclass
class FakeSamplingParams:
    tokens_to_generate: int = 64
    logprobs: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int = -1
    top_n_logprobs: int = 0


assert set(FakeSamplingParams.__dataclass_fields__) == set(SAMPLING_DEFAULTS)


class FakeEngine:
    def __init__(self, tokenizer, max_positions: int = 64, step_delay: float = 0.0, eod_after: int | None = None):
        self.tokenizer, self.max_positions, self.step_delay, self.eod_after = tokenizer, max_positions, step_delay, eod_after
        self.calls: list[tuple[list, FakeSamplingParams]] = []
        self.steps: list[int] = []   # steps each call ran (cancelled prompts end a call early)
        self.fail_next = False
        self.lock = threading.Lock()

    def next_token(self, t: int) -> int:
        v = self.tokenizer.vocab_size
        nxt = (7 * t + 3) % v
        return (nxt + 1) % v if nxt == self.tokenizer.eod else nxt

    def top(self, previous: int, k: int) -> list[tuple[int, float]]:
        """The fake distribution's k most likely tokens after ``previous``."""
        first = self.next_token(previous)
        return [((first + j) % self.tokenizer.vocab_size, -0.5 - j) for j in range(k)]

    def log_prob(self, previous: int, token: int) -> float:
        return dict(self.top(previous, 5)).get(token, OTHER)

    def expected(self, prompt, n: int, add_bos: bool = False) -> list[int]:
        """What generate() answers for one prompt (a string or token ids), alone."""
        ids = self.tokenizer.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        tokens = ([self.tokenizer.eod] if add_bos else []) + ids
        for step in range(n):
            if self.eod_after is not None and step == self.eod_after:
                tokens.append(self.tokenizer.eod)
                break
            tokens.append(self.next_token(tokens[-1]))
        return tokens

    def generate(self, prompts, params, callback=None):
        self.calls.append((list(prompts), params))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("fake engine failure")
        tok, k = self.tokenizer, params.top_n_logprobs
        tokens = [([tok.eod] if params.add_BOS else []) + (tok.tokenize(p) if isinstance(p, str) else list(p))
                  for p in prompts]
        lengths = [len(t) for t in tokens]
        first, width = min(lengths), max(lengths) + params.tokens_to_generate
        active = [True] * len(prompts)
        self.steps.append(0)
        prev = 0
        for ctx in range(first, width):            # column ctx receives a token (as in the real engine)
            self.steps[-1] += 1
            new = []
            for i, seq in enumerate(tokens):
                if not active[i] or lengths[i] > ctx:
                    new.append(None)
                    continue
                made = len(seq) - lengths[i]
                t = tok.eod if self.eod_after is not None and made == self.eod_after else self.next_token(seq[-1])
                seq.append(t)
                new.append(t)
                if t == tok.eod or made + 1 == params.tokens_to_generate:
                    active[i] = False
            step = None
            if params.logprobs:                    # log p of the tokens in columns prev+1 .. ctx
                step = StepLogProbs(prev, [[self.log_prob(seq[c], seq[c + 1]) if c + 1 < len(seq) else 0.0
                                            for c in range(prev, ctx)] for seq in tokens],
                                    [[self.top(seq[c], k) if c < len(seq) else [] for c in range(prev, ctx)]
                                     for seq in tokens] if k else None)
            if callback is not None:
                for i in callback(ctx - first, new, step) or ():
                    active[i] = False
            prev = ctx
            if not any(active):
                break
            time.sleep(self.step_delay)
        return {"text": [tok.detokenize(s) for s in tokens],
                "segments": [[tok.detokenize([t]) for t in s] for s in tokens],
                "logprobs": [[self.log_prob(a, b) for a, b in zip(s, s[1:])] for s in tokens] if params.logprobs else None,
                "top_n_logprobs": [[self.top(a, k) for a in s[:-1]] for s in tokens] if k else None,
                "tokens": tokens}

    def beam_search(self, prompts, tokens_to_generate, beam_width, length_penalty=1.0, stop_token=None,
                    add_BOS=False, prevent_newline_after_colon=False):
        seq = self.expected(prompts[0], tokens_to_generate, add_BOS)
        return {"text": [self.tokenizer.detokenize(seq)] * beam_width,
                "segments": [[self.tokenizer.detokenize([t]) for t in seq]] * beam_width,
                "scores": [-1.0] * beam_width}


def start_fake_server(tokenizer, step_delay: float = 0.01, max_batch_size: int = 8, model_name: str = "fake"):
    """A real werkzeug server on a free loopback port over a FakeEngine, its serving loop in a thread.

    Returns ``(url, engine, loop, stop)``; ``stop()`` ends the loop and checks the port is free again.
    """
    import socket

    import requests

    from lessons_pkg.launch import free_port
    from lessons_pkg.serving import ControlChannel, ServingLoop

    engine = FakeEngine(tokenizer, max_positions=64, step_delay=step_delay)
    port = free_port()
    loop = ServingLoop(engine, tokenizer, ControlChannel(), FakeSamplingParams, 64, model_name, "127.0.0.1", port,
                       max_batch_size=max_batch_size, heartbeat_s=0.5)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            requests.get(url + "/health", timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)

    def stop():
        loop.stopping.set()
        thread.join(10)
        assert not thread.is_alive()
        with socket.socket() as s:   # the port is free again (SO_REUSEADDR, as every server sets it: TIME_WAIT)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()

    return url, engine, loop, stop
