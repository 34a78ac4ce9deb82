"""OpenAI's completion objects from the engine's answers: whole answers, and streamed chunks.

``POST /v1/completions`` answers::

    {"id": "cmpl-...", "object": "text_completion", "created": 1700000000, "model": "...",
     "choices": [{"index": 0, "text": "...", "logprobs": null, "finish_reason": "length" | "stop"}],
     "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}}

and, with ``stream: true``, server-sent events ``data: {chunk}`` whose choices
carry the new text, then ``data: [DONE]``. ``finish_reason`` is ``"stop"``
when a stop string or the end-of-document token ended the text, ``"length"``
when ``max_tokens`` did. The engine's text starts with the prompt (Megatron's
convention); OpenAI's does only with ``echo: true``.
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


def choice(index: int, prompt: str, tokens: list[int], prompt_length: int, wants: int, tokenizer,
           stops: list[str], echo: bool, segments=None, logprobs=None) -> dict:
    """One choice of a whole (not streamed) answer."""
    gen, ended = generated_part(tokens, prompt_length, tokenizer.eod)
    text = tokenizer.detokenize(gen)
    cut = find_stop(text, stops)
    if cut >= 0:
        text = text[:cut]
    reason = "stop" if cut >= 0 or ended or len(gen) < wants else "length"
    lp = None
    if logprobs is not None:
        first = 0 if echo else prompt_length
        n = prompt_length + len(gen)
        token_strings = list(segments[first:n])
        token_logprobs = ([None] if first == 0 else []) + list(logprobs[max(first - 1, 0):n - 1])
        offsets, pos = [], 0
        for s in token_strings:
            offsets.append(pos)
            pos += len(s)
        lp = {"tokens": token_strings, "token_logprobs": token_logprobs, "top_logprobs": None,
              "text_offset": offsets}
    return {"index": index, "text": (prompt + text) if echo else text, "logprobs": lp, "finish_reason": reason}


def completion(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
               cid: str | None = None) -> dict:
    return {"id": cid or new_id(), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}}


def sse(obj) -> str:
    """One server-sent event."""
    return "data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n"


class StreamState:
    """The text sent so far for one prompt of a streamed request."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = 0
        self.reason: str | None = None   # set once the prompt is finished

    def add(self, token: int, tokenizer) -> str:
        """Append a generated token; returns the new text that can be sent now ('' if none yet)."""
        if self.reason is not None:
            return ""
        if token == tokenizer.eod:
            self.reason = "stop"
            return self.flush(tokenizer)
        self.tokens.append(token)
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

    def flush(self, tokenizer) -> str:
        """Whatever was held back (the prompt ended without completing a stop string)."""
        text = tokenizer.detokenize(self.tokens)
        cut = find_stop(text, self.stops)
        end = cut if cut >= 0 else len(text)
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new
