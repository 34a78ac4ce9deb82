"""How many rows of a checkpoint's word embedding are real tokens, whoever wrote the checkpoint.

Megatron pads the vocabulary so that every tensor rank holds an equal slice of
the embedding, rounding the tokenizer's size up to a multiple of
``make_vocab_size_divisible_by x TP`` (GPT-2's 50257 -> 50304 at TP=1, 50432 at
TP=2). The files hold the padded matrix; the real size is recorded, if at all,
by whoever wrote them:

    --true-vocab-size N      on the command line (Megatron's tools/checkpoint_util.py flag)
    args.true_vocab_size     this course's checkpoints
    args.orig_vocab_size     transformers' Megatron converter
    a tokenizer              --vocab-file, the checkpoint folder's vocab.json, or args.vocab_file if it exists

Megatron-LM's own checkpoints record only ``padded_vocab_size``. The first
source in the list wins, and a tokenizer given beside it must agree. A tokenizer alone is accepted only when Megatron's
padding rule, at the checkpoint's own TP, maps its size onto the checkpoint's
padded size: then the extra rows are padding. Anything else is refused, naming
both sizes and the rule. With no source at all the size stays unknown and a
caller keeps every padded row (:attr:`VocabSize.true` is ``None``).
"""
from __future__ import annotations

from dataclasses import dataclass

from lessons_pkg.errors import CheckpointError
from lessons_pkg.tensor_parallel.utils import vocab_size_with_padding


@dataclass(frozen=True)
class VocabSize:
    """The padded rows a checkpoint holds, and how many are real tokens (``None``: not known)."""
    padded: int
    true: int | None
    source: str             # where ``true`` came from, for messages ("args.orig_vocab_size", ...)

    @property
    def rows(self) -> int:
        """Rows a model of this checkpoint keeps: the real tokens, or every padded row when that is unknown."""
        return self.padded if self.true is None else self.true


def _get(args, name):
    return getattr(args, name, None)


def padding_rule(size: int, tp: int, divisible_by: int) -> str:
    """Megatron's rule in words, for error messages."""
    multiple = divisible_by * tp
    return (f"Megatron pads a vocabulary to a multiple of make_vocab_size_divisible_by ({divisible_by}) x the "
            f"checkpoint's tensor-parallel size ({tp}) = {multiple}: {size} -> "
            f"{vocab_size_with_padding(size, tp, divisible_by)[0]}")


def resolve_vocab_size(args, padded: int, tp: int, explicit: int | None = None, tokenizer_size: int | None = None,
                       tokenizer_source: str = "the tokenizer", where: str = "the checkpoint") -> VocabSize:
    """The real vocabulary of a checkpoint whose embedding has ``padded`` rows and was saved at ``tp``.

    ``args`` is the checkpoint's saved arguments (any attribute bag);
    ``explicit`` a ``--true-vocab-size``; ``tokenizer_size`` the size of a
    tokenizer found for it (``tokenizer_source`` says which, for messages).
    """
    divisible_by = int(_get(args, "make_vocab_size_divisible_by") or 128)
    for source, value in (("--true-vocab-size", explicit), ("args.true_vocab_size", _get(args, "true_vocab_size")),
                          ("args.orig_vocab_size", _get(args, "orig_vocab_size"))):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where}: {source} must be a positive integer, got {value!r}")
        if value > padded:
            raise CheckpointError(f"{where}: {source} is {value}, but the word embedding has only {padded} rows "
                             f"(padded_vocab_size): not the vocabulary of this checkpoint")
        if tokenizer_size is not None and tokenizer_size != value:
            raise CheckpointError(f"{where}: {source} is {value} but {tokenizer_source} has {tokenizer_size} tokens: "
                             "not the tokenizer this model was trained with")
        return VocabSize(padded, value, source)
    if tokenizer_size is None:
        return VocabSize(padded, None, "unknown")
    if tokenizer_size > padded or vocab_size_with_padding(tokenizer_size, tp, divisible_by)[0] != padded:
        raise CheckpointError(f"{where} records only its padded vocabulary ({padded} rows, no true_vocab_size or "
                         f"orig_vocab_size), and {tokenizer_source} has {tokenizer_size} tokens: "
                         f"{padding_rule(tokenizer_size, tp, divisible_by)}, not {padded}. Not the tokenizer this "
                         f"model was trained with (or pass --true-vocab-size)")
    return VocabSize(padded, tokenizer_size, f"{tokenizer_source} ({tokenizer_size} tokens, padded to {padded})")


def vocab_file_size(path: str) -> int:
    """Entries of a GPT-2 ``vocab.json`` (the tokenizer's size), or a ``ValueError`` naming the file."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read vocabulary file {path}: {e}") from None
    if not isinstance(vocab, dict) or not vocab:
        raise CheckpointError(f"{path}: expected a non-empty JSON object token -> id")
    return len(vocab)
