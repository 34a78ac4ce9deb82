"""OpenAI's completion objects from the engine's answers: whole answers, and streamed chunks.

``POST /v1/completions`` answers::

    {"id": "cmpl-...", "object": "text_completion", "created": 1700000000, "model": "...",
     "choices": [{"index": 0, "text": "...", "logprobs": null, "finish_reason": "length" | "stop"}],
     "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}}

and, with ``stream: true``, server-sent events ``data: {chunk}`` whose choices
carry the new text, then ``data: [DONE]``; with ``stream_options:
{"include_usage": true}`` every chunk has ``"usage": null`` and one more chunk
with ``"choices": []`` and the usage comes before ``[DONE]``.
``finish_reason`` is ``"stop"`` when a stop string or the end-of-document
token ended the text, ``"length"`` when ``max_tokens`` did. The engine's text
starts with the prompt (Megatron's convention); OpenAI's does only with
``echo: true``.

With ``logprobs: k`` a choice carries, per token (the prompt's first with
``echo``, whose log-probability is ``null``, then the generated ones)::

    {"tokens": [" world", ...], "token_logprobs": [-2.1, ...],
     "top_logprobs": [{" world": -2.1, " there": -2.4}, ...],    # the k most likely, and the chosen one
     "text_offset": [5, ...]}                                      # characters before the token

``tokens`` are the engine's segments (a character split over two tokens
shows as replacement characters, as in Megatron's segments), and
``text_offset`` counts the segments before each token from the start of the
prompt, with or without echo. The tokens are those generated up to the one
that completed a stop string (the stop string is cut from the text only). Two
alternatives with the same text keep the more likely one. ``top_logprobs``
is ``null`` for ``logprobs: 0``. Streamed chunks carry the log-probs of their
own tokens; joined, they equal the whole answer's.

``best_of > n`` keeps the n rows of highest mean log-probability per
generated token (the end-of-document token included when it ended the row),
best first.
"""
from __future__ import annotations

import json
import time
import uuid


def new_id() -> str:
    return "cmpl-" + uuid.uuid4().hex[:24]


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (not sent yet)."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


def generated_part(tokens: list[int], prompt_length: int, eod: int) -> tuple[list[int], bool]:
    """The generated tokens (end-of-document token dropped) and whether that token ended them."""
    gen = list(tokens[prompt_length:])
    if gen and gen[-1] == eod:
        return gen[:-1], True
    return gen, False


def mean_log_prob(logprobs: list[float], prompt_length: int) -> float:
    """Mean log-probability of a row's generated tokens (``best_of``'s score); 0 when none were generated."""
    generated = logprobs[prompt_length - 1:]
    return sum(generated) / len(generated) if generated else 0.0


def best_rows(scores: list[float], n: int) -> list[int]:
    """The ``n`` rows of highest score, best first (the earlier row wins a tie)."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:n]


def top_dict(top, chosen: int, chosen_log_prob: float, segment) -> dict[str, float]:
    """One position's ``top_logprobs``: the k most likely tokens' texts, and the chosen token's (OpenAI: up to k + 1)."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(segment(token), value)
    out.setdefault(segment(chosen), chosen_log_prob)
    return out


class LogProbsBuilder:
    """Accumulates OpenAI's ``logprobs`` object token by token; ``text_offset`` grows by each token's segment."""

    def __init__(self, segment, with_top: bool, offset: int = 0):
        self.segment, self.with_top, self.offset = segment, with_top, offset

    def build(self, tokens: list[int], log_probs: list, tops: list) -> dict:
        """``log_probs[j]``/``tops[j]`` of ``tokens[j]`` (None for the first token of the prompt)."""
        texts, offsets, top_logprobs = [], [], []
        for token, value, top in zip(tokens, log_probs, tops):
            text = self.segment(token)
            texts.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            top_logprobs.append(top_dict(top, token, value, self.segment) if self.with_top and value is not None
                                else None)
        return {"tokens": texts, "token_logprobs": list(log_probs),
                "top_logprobs": top_logprobs if self.with_top else None, "text_offset": offsets}


def choice(index: int, prompt_text: str, tokens: list[int], prompt_length: int, wants: int, tokenizer,
           stops: list[str], echo: bool, segment=None, logprobs=None, top=None, k: int | None = None) -> dict:
    """One choice of a whole (not streamed) answer; ``k`` (OpenAI's ``logprobs``) None: no log-probs."""
    gen, ended = generated_part(tokens, prompt_length, tokenizer.eod)
    text = tokenizer.detokenize(gen)
    cut = find_stop(text, stops)
    if cut >= 0:
        text = text[:cut]
    reason = "stop" if cut >= 0 or ended or len(gen) < wants else "length"
    lp = None
    if k is not None:
        n = prompt_length + len(gen)
        first = 0 if echo else prompt_length
        builder = LogProbsBuilder(segment, k > 0)
        if not echo:
            builder.offset = sum(len(segment(t)) for t in tokens[:prompt_length])
        positions = range(first, n)                     # token j has log-prob logprobs[j - 1]
        lp = builder.build([tokens[j] for j in positions],
                           [None if j == 0 else logprobs[j - 1] for j in positions],
                           [None if j == 0 or top is None else top[j - 1] for j in positions])
    return {"index": index, "text": (prompt_text + text) if echo else text, "logprobs": lp, "finish_reason": reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
               cid: str | None = None) -> dict:
    return {"id": cid or new_id(), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj) -> str:
    """One server-sent event."""
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


class StreamState:
    """The text sent so far for one choice of a streamed request, and the tokens whose text is not sent yet.

    A token's text may be held back (the start of a stop string, or half a
    character); its log-probs go out with the chunk that carries its text.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = 0
        self.reason: str | None = None   # set once the choice is finished
        self.pending: list[tuple] = []   # (token, log p, top) of tokens not released yet

    def add(self, token: int, tokenizer, log_prob=None, top=None) -> str:
        """Append a generated token; returns the new text that can be sent now ('' if none yet)."""
        if self.reason is not None:
            return ""
        if token == tokenizer.eod:
            self.reason = "stop"
            return self.flush(tokenizer)
        self.tokens.append(token)
        self.pending.append((token, log_prob, top))
        text = tokenizer.detokenize(self.tokens)
        if text.endswith("\ufffd"):       # a character split across tokens: wait for the rest
            return ""
        cut = find_stop(text, self.stops)
        if cut >= 0:
            self.reason = "stop"
            new, self.sent = text[self.sent:cut], cut
            return new
        end = len(text) - held_back(text, self.stops)
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new

    def release(self, new_text: str) -> list[tuple]:
        """The pending tokens that go out now: with text, or all of them once the choice is finished."""
        if not new_text and self.reason is None:
            return []
        out, self.pending = self.pending, []
        return out

    def flush(self, tokenizer) -> str:
        """Whatever was held back (the choice ended without completing a stop string)."""
        text = tokenizer.detokenize(self.tokens)
        cut = find_stop(text, self.stops)
        end = cut if cut >= 0 else len(text)
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new
