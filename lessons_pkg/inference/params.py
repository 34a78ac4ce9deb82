"""What a generation request may ask for: Megatron-LM's parameters, defaults and validation rules.

The names and defaults are those of Megatron's ``generate_and_post_process``
(``megatron/inference/text_generation/api.py``); the rules are those its REST
server checks before generating. Sampling in one line per setting:

    top_k == 1                greedy: the most likely token
    top_k > 1                 sample among the k most likely tokens
    top_p > 0                 sample among the most likely tokens whose mass just exceeds top_p
    top_k == 0 and top_p == 0 sample from the whole distribution
    temperature               logits / temperature before top-k / top-p (ignored by greedy)
    top_p_decay, top_p_bound  after each token, top_p <- max(top_p * decay, bound)

:meth:`SamplingParams.validate` raises ``ValueError`` naming the field and its
value. The engine calls it on every rank before its first collective, so a bad
request is refused everywhere alike and never leaves the ranks out of step.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


class GenerationError(RuntimeError):
    """Generation failed on some rank; every rank of the model raises it for the same request."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    tokens_to_generate: int = 64
    logprobs: bool = False                # Megatron's return_output_log_probs
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    top_p_decay: float = 0.0
    top_p_bound: float = 0.0
    add_BOS: bool = False                 # prepend the end-of-document token to every prompt
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    random_seed: int = -1                 # -1: a fresh, unrepeatable seed
    # True: a sequence ends at the end-of-document token (kept in the output). False: it does not, and every
    # prompt gets exactly tokens_to_generate tokens (Megatron still cuts its output at the first such token
    # and only skips the early exit of the loop; generating them all is what a benchmark or a client asking
    # for a fixed length wants).
    use_eod_token_for_early_termination: bool = True
    # Megatron-core's top_n_logprobs: with logprobs, the k most likely tokens and their log-probabilities at every
    # position too (OpenAI's logprobs: k), taken from the vocab-parallel logits (log_probs.py)
    top_n_logprobs: int = 0

    def validate(self, max_position_embeddings: int | None = None, prompt_lengths=()) -> None:
        """Raise ``ValueError`` naming the first field that breaks Megatron's rules.

        ``prompt_lengths`` are token counts (after ``add_BOS``); with
        ``max_position_embeddings`` they bound ``tokens_to_generate``.
        """
        flags = ("logprobs", "add_BOS", "stop_on_eol", "stop_on_double_eol", "prevent_newline_after_colon",
                 "use_eod_token_for_early_termination")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not _is_int(self.tokens_to_generate) or self.tokens_to_generate < 0:
            raise ValueError(f"tokens_to_generate must be an integer >= 0, got {self.tokens_to_generate!r}")
        if self.tokens_to_generate == 0 and not self.logprobs:
            raise ValueError("tokens_to_generate=0 (scoring only) implies logprobs should be True")
        if not _is_number(self.temperature) or not 0.0 < self.temperature <= 100.0:
            raise ValueError(f"temperature must be a positive number <= 100.0, got {self.temperature!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= 1000:
            raise ValueError(f"top_k must be an integer in [0, 1000], got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in [0, 1], got {self.top_p!r}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ValueError(f"cannot set both top-k and top-p samplings (top_k={self.top_k}, top_p={self.top_p})")
        if not _is_number(self.top_p_decay) or not 0.0 <= self.top_p_decay <= 1.0:
            raise ValueError(f"top_p_decay must be a number in [0, 1], got {self.top_p_decay!r}")
        if self.top_p_decay > 0.0 and self.top_p == 0.0:
            raise ValueError(f"top_p_decay ({self.top_p_decay}) cannot be set without top_p")
        if not _is_number(self.top_p_bound) or self.top_p_bound < 0.0:
            raise ValueError(f"top_p_bound must be a number >= 0, got {self.top_p_bound!r}")
        if self.top_p_bound > 0.0:
            if self.top_p == 0.0:
                raise ValueError(f"top_p_bound ({self.top_p_bound}) cannot be set without top_p")
            if self.top_p_bound > self.top_p:
                raise ValueError(f"top_p_bound ({self.top_p_bound}) must be greater than 0 and at most "
                                 f"top_p ({self.top_p})")
        if not _is_int(self.top_n_logprobs) or self.top_n_logprobs < 0:
            raise ValueError(f"top_n_logprobs must be an integer >= 0, got {self.top_n_logprobs!r}")
        if self.top_n_logprobs > 0 and not self.logprobs:
            raise ValueError(f"top_n_logprobs ({self.top_n_logprobs}) needs logprobs=True")
        if not _is_int(self.random_seed) or self.random_seed < -1:
            raise ValueError(f"random_seed must be an integer >= 0 (or -1 for none), got {self.random_seed!r}")
        check_lengths(prompt_lengths, self.tokens_to_generate, max_position_embeddings, self.add_BOS)

    @classmethod
    def from_dict(cls, values: dict) -> SamplingParams:
        """Build from a request's fields; an unknown field is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def check_lengths(prompt_lengths, tokens_to_generate: int, max_position_embeddings: int | None,
                  add_BOS: bool = False) -> None:
    """Every prompt non-empty, and the longest prompt + ``tokens_to_generate`` within the model's positions."""
    lengths = list(prompt_lengths)
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty: empty prompts require add_BOS=true"
                             if not add_BOS else f"prompt {i} has no tokens")
    if lengths and max_position_embeddings is not None:
        longest = max(lengths)
        if longest + tokens_to_generate > max_position_embeddings:
            raise ValueError(
                f"prompt length ({longest} tokens, prompt {lengths.index(longest)}) + tokens_to_generate "
                f"({tokens_to_generate}) = {longest + tokens_to_generate} exceeds the model's "
                f"max_position_embeddings ({max_position_embeddings})")
