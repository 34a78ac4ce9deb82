"""Prompts to a padded token batch, and tokens back to text and per-token segments (Megatron's conventions).

Batch layout (Megatron's ``tokenize_prompts``): prompts are tokenized
(``add_BOS`` prepends the end-of-document token), and every row is padded on
the RIGHT with that token to ``longest prompt + tokens_to_generate``. Column j
of every row is position j, so generation can step column by column with no
attention mask: a shorter prompt simply starts generating at an earlier column.

Segments (Megatron's ``detokenize_generations``): each token's own string,
its byte-level symbols mapped back to bytes and decoded as UTF-8 with
replacement characters (a token may hold part of a multi-byte character).
"""
from __future__ import annotations

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of ``vocab.json``; a space shows as ``Ġ``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:                            # control bytes and the space move to 256, 257, ...
            table[byte] = chr(256 + extra)
            extra += 1
    return table


class TokenText:
    """Tokenizer helpers the engine needs: prompts -> ids, ids -> text and segments, special ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eod = tokenizer.eod
        encoder = getattr(tokenizer, "encoder", None)
        self.decoder = {i: t for t, i in encoder.items()} if encoder else None
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.eol = self._single_token("\n")            # GPT-2: 198
        self.double_eol = self._single_token("\n\n")   # GPT-2: 628 (None if the vocabulary has no such token)
        self.colon = self._single_token(":")

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenizer.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def tokenize_prompts(self, prompts: list[str], add_BOS: bool) -> list[list[int]]:
        return [([self.eod] if add_BOS else []) + self.tokenizer.tokenize(p) for p in prompts]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.detokenize(ids)

    def segment(self, token: int) -> str:
        """One token's text (Megatron's byte-level decode with ``errors='replace'``)."""
        if self.decoder is None:
            return self.tokenizer.detokenize([token])
        symbols = self.decoder[token]
        if all(c in self.byte_decoder for c in symbols):
            return bytearray(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return symbols                                  # a special token such as <|endoftext|>

    def segments(self, ids: list[int]) -> list[str]:
        return [self.segment(t) for t in ids]


def pad_batch(prompt_ids: list[list[int]], tokens_to_generate: int, pad_id: int,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [b, longest + tokens_to_generate], lengths [b])``, rows right-padded with ``pad_id``."""
    lengths = [len(p) for p in prompt_ids]
    width = max(lengths) + tokens_to_generate
    tokens = torch.full((len(prompt_ids), width), pad_id, dtype=torch.int64, device=device)
    for row, ids in enumerate(prompt_ids):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return tokens, torch.tensor(lengths, dtype=torch.int64, device=device)
