"""GPT-2's byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt``, and training one locally.

The two files are the whole tokenizer:

* ``vocab.json`` maps each token (bytes written with GPT-2's printable
  byte-to-unicode alphabet, so a leading space shows as ``Ġ``) to its id;
  GPT-2's has 50257 entries, the last being ``<|endoftext|>`` = 50256.
* ``merges.txt`` (after a ``#version`` line) lists merges ``a b`` in priority
  order: the text's bytes start as single symbols and the highest-priority
  adjacent pair present is merged repeatedly.

Text is first split by GPT-2's regular expression (words with their leading
space, numbers, punctuation runs, whitespace), then each piece is merged on
its own. :class:`GPT2BPETokenizer` is Megatron's ``--tokenizer-type
GPT2BPETokenizer`` (``vocab_size``, ``eod``, ``tokenize``, ``detokenize``),
built on Hugging Face's fast implementation. Note that in ``transformers`` 5,
``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently ignores the
files and builds an *empty* tokenizer, so we read the files ourselves and pass
``vocab=``/``merges=``.

Without GPT-2's files (no network), :func:`train_byte_level_bpe` learns a
byte-level BPE on the corpus with ``tokenizers`` and writes the same two files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from lessons_pkg.errors import OutputError, UserError

EOD_TOKEN = "<|endoftext|>"


def load_vocab_and_merges(vocab_file: str, merge_file: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Read GPT-2's two files; raise naming the file if either is empty or malformed."""
    with open(vocab_file, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # cut short, or not text at all
            raise UserError(f"{vocab_file}: not GPT-2's vocab.json ({e})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise UserError(f"{vocab_file}: expected a non-empty JSON object token -> id")
    if "" in vocab:  # the BPE model cannot hold it (tokenizers fails deep inside)
        raise UserError(f"{vocab_file}: token id {vocab['']} is the empty string; a BPE vocabulary has no empty token")
    bad = next(((t, i) for t, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool) or i < 0), None)
    if bad is not None:
        raise UserError(f"{vocab_file}: token {bad[0]!r} has id {bad[1]!r}; ids are integers >= 0")
    if len(set(vocab.values())) != len(vocab):
        ids = sorted(vocab.values())
        twice = next(a for a, b in zip(ids, ids[1:]) if a == b)
        raise UserError(f"{vocab_file}: id {twice} is given to more than one token: "
                        f"{sorted(t for t, i in vocab.items() if i == twice)[:3]}")
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{merge_file}: not GPT-2's merges.txt ({e})") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise UserError(f"{merge_file}:{number}: a merge is two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


class GPT2BPETokenizer:
    """Megatron's GPT-2 tokenizer: ``tokenize(text) -> ids``, ``detokenize(ids) -> text``, ``eod``."""

    def __init__(self, vocab_file: str, merge_file: str):
        from transformers import GPT2TokenizerFast  # imported here: importing lessons_pkg.data stays light

        vocab, merges = load_vocab_and_merges(vocab_file, merge_file)
        if EOD_TOKEN not in vocab:
            raise UserError(f"{vocab_file} has no {EOD_TOKEN} token, which marks document ends (eod)")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self._tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
        self.encoder = vocab
        self.eod = vocab[EOD_TOKEN]

    @property
    def vocab_size(self) -> int:
        """Entries of ``vocab.json`` (50257 for GPT-2), before Megatron pads it for tensor parallelism."""
        return len(self.encoder)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, token_ids) -> str:
        return self._tokenizer.decode([int(t) for t in token_ids], clean_up_tokenization_spaces=False)


def build_tokenizer(vocab_file: str, merge_file: str, tokenizer_type: str = "GPT2BPETokenizer") -> GPT2BPETokenizer:
    """The tokenizer ``--tokenizer-type`` names; only GPT2BPETokenizer is provided."""
    if tokenizer_type != "GPT2BPETokenizer":
        raise UserError(f"--tokenizer-type {tokenizer_type!r} is not supported; use GPT2BPETokenizer")
    return GPT2BPETokenizer(vocab_file, merge_file)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, output_dir: str,
                         min_frequency: int = 2) -> tuple[str, str]:
    """Learn a byte-level BPE of ``vocab_size`` tokens on ``texts``; write GPT-2's two files.

    The vocabulary starts from the 256 single bytes (so any text can be
    encoded, as with GPT-2) plus ``<|endoftext|>``, then adds merges by
    frequency. Returns ``(vocab.json path, merges.txt path)``. No texts, or
    texts too few to learn ``vocab_size`` tokens, is a ``ValueError`` naming the
    numbers, and nothing is written.
    """
    from tokenizers import ByteLevelBPETokenizer

    if vocab_size < 257:
        raise UserError(f"vocab_size ({vocab_size}) must be at least 257: 256 bytes + {EOD_TOKEN}")
    seen = {"texts": 0, "chars": 0}

    def counted(texts):
        for text in texts:
            seen["texts"] += 1
            seen["chars"] += len(text)
            yield text

    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(counted(texts), vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN], show_progress=False)
    if seen["chars"] == 0:
        raise UserError(f"no text to train a tokenizer on ({seen['texts']} texts, all empty)")
    if tokenizer.get_vocab_size() < vocab_size:
        raise UserError(f"{seen['texts']} texts ({seen['chars']} characters) yield only "
                         f"{tokenizer.get_vocab_size()} tokens with min_frequency {min_frequency}, "
                         f"not the {vocab_size} asked for: give more text or a smaller vocab_size")
    os.makedirs(output_dir, exist_ok=True)
    try:
        tokenizer.save_model(output_dir)  # writes vocab.json and merges.txt
    except Exception as e:  # tokenizers reports a failed write (a full disk, no permission) as a bare Exception
        raise OutputError(f"cannot write the tokenizer to {output_dir}: {e}") from None
    return os.path.join(output_dir, "vocab.json"), os.path.join(output_dir, "merges.txt")
