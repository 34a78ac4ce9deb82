"""Training text and a tokenizer that need no network, for the chapter 5 demos.

The original lesson trains on SQuAD contexts with the GPT-2 tokenizer, both
downloaded from the Hugging Face hub. That path is kept (``--dataset squad``,
``--model-name gpt2``); without network we fall back to text that ships with
every Python: the docstrings of the standard library, and to a small byte-level
BPE tokenizer trained on it in a second or two.

Batches are random windows of ``seq_len`` consecutive tokens from the
concatenated token stream: ``[batch, seq_len]`` token ids.
"""
from __future__ import annotations

from typing import Iterator

import torch
from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from lessons_pkg.data.python_docs import module_docstrings, stdlib_files

END_OF_TEXT = "<|endoftext|>"


def stdlib_docstrings(max_chars: int = 400_000) -> list[str]:
    """Docstrings of the top-level modules of Python's standard library, in file-name order."""
    texts, total = [], 0
    for path in stdlib_files(recursive=False):
        for doc in module_docstrings(path):
            if len(doc) > 80:
                texts.append(doc)
                total += len(doc)
        if total >= max_chars:  # whole files only
            break
    if not texts:
        raise RuntimeError("found no docstrings in the standard library")
    return texts


def load_texts(dataset: str, max_chars: int = 400_000) -> list[str]:
    """``'squad'``: SQuAD contexts from the hub (a ``RuntimeError`` when it cannot be loaded); ``'stdlib'``: local text."""
    if dataset == "squad":
        try:
            from datasets import load_dataset

            contexts, total = [], 0
            for context in dict.fromkeys(load_dataset("squad", split="train")["context"]):  # unique, in order
                contexts.append(context)
                total += len(context)
                if total >= max_chars:
                    break
            return contexts
        except Exception as e:  # noqa: BLE001 - any hub failure: asked for by name, so an error
            raise RuntimeError(f"--dataset squad: could not load it ({type(e).__name__}: {e}); "
                               "--dataset stdlib needs no network") from None
    elif dataset != "stdlib":
        raise ValueError(f"dataset must be 'squad' or 'stdlib', got {dataset!r}")
    return stdlib_docstrings(max_chars)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2's kind) with ``vocab_size`` entries, trained on ``texts``."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size ({vocab_size}) must be at least 257 (256 bytes + {END_OF_TEXT})")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                            show_progress=False)
    return bpe._tokenizer


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts encoded and joined by the end-of-text token: ``[num_tokens]`` int64.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers tokenizer.
    """
    if isinstance(tokenizer, Tokenizer):
        eot = tokenizer.token_to_id(END_OF_TEXT)
        encoded = [e.ids for e in tokenizer.encode_batch(texts)]
    else:
        eot = tokenizer.eos_token_id
        encoded = tokenizer(texts)["input_ids"]
    ids = [i for doc in encoded for i in doc + [eot]]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch_size, seq_len]`` of consecutive tokens starting at random offsets."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"the token stream ({tokens.numel()} tokens) is not longer than seq_len ({seq_len})")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)  # [seq_len]
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size, 1), generator=generator)  # [batch, 1]
        yield tokens[starts + offsets]  # [batch, seq_len]
