"""A test double of lessons_pkg.inference.InferenceEngine for testing the HTTP/queue layer in one process.

Its "model" is arithmetic: the next token after ``t`` is ``(7 * t + 3) % vocab``
(never the end-of-document token unless ``eod_after`` says so), so every answer
is known without a network and independent of the batch it ran in.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from lessons_pkg.serving.schema import SAMPLING_DEFAULTS


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


assert set(FakeSamplingParams.__dataclass_fields__) == set(SAMPLING_DEFAULTS)


class FakeEngine:
    def __init__(self, tokenizer, max_positions: int = 64, step_delay: float = 0.0, eod_after: int | None = None):
        self.tokenizer, self.max_positions, self.step_delay, self.eod_after = tokenizer, max_positions, step_delay, eod_after
        self.calls: list[tuple[list[str], FakeSamplingParams]] = []
        self.steps: list[int] = []   # steps each call ran (cancelled prompts end a call early)
        self.fail_next = False
        self.lock = threading.Lock()

    def next_token(self, t: int) -> int:
        v = self.tokenizer.vocab_size
        nxt = (7 * t + 3) % v
        return (nxt + 1) % v if nxt == self.tokenizer.eod else nxt

    def expected(self, prompt: str, n: int, add_bos: bool = False) -> list[int]:
        """What generate() answers for one prompt, alone."""
        tokens = ([self.tokenizer.eod] if add_bos else []) + self.tokenizer.tokenize(prompt)
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
        tok = self.tokenizer
        tokens = [([tok.eod] if params.add_BOS else []) + tok.tokenize(p) for p in prompts]
        active = [True] * len(prompts)
        self.steps.append(0)
        for step in range(params.tokens_to_generate):
            self.steps[-1] = step + 1
            new = []
            for i, seq in enumerate(tokens):
                if not active[i]:
                    new.append(None)
                    continue
                t = tok.eod if self.eod_after is not None and step == self.eod_after else self.next_token(seq[-1])
                seq.append(t)
                new.append(t)
                if t == tok.eod:
                    active[i] = False
            if callback is not None:
                for i in callback(step, new) or ():
                    active[i] = False
            if not any(active):
                break
            time.sleep(self.step_delay)
        return {"text": [tok.detokenize(s) for s in tokens],
                "segments": [[tok.detokenize([t]) for t in s] for s in tokens],
                "logprobs": [[-0.5] * (len(s) - 1) for s in tokens] if params.logprobs else None,
                "tokens": tokens}

    def beam_search(self, prompts, tokens_to_generate, beam_width, length_penalty=1.0, stop_token=None,
                    add_BOS=False, prevent_newline_after_colon=False):
        seq = self.expected(prompts[0], tokens_to_generate, add_BOS)
        return {"text": [self.tokenizer.detokenize(seq)] * beam_width,
                "segments": [[self.tokenizer.detokenize([t]) for t in seq]] * beam_width,
                "scores": [-1.0] * beam_width}
