"""Offline training text and tokenizer for the chapter 5 demos (src/ch5/text_data.py)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src" / "ch5"))
from text_data import load_texts, random_windows, token_stream, train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def texts():
    return load_texts("stdlib", max_chars=50_000)


def test_stdlib_text_and_bpe_tokenizer_round_trip(texts):
    assert sum(map(len, texts)) >= 50_000
    tokenizer = train_tokenizer(texts, vocab_size=300)
    assert tokenizer.get_vocab_size() == 300
    sample = texts[0][:200]
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample  # byte-level BPE is lossless
    tokens = token_stream(texts, tokenizer)
    assert tokens.dtype == torch.long and tokens.max() < 300
    assert len(tokens) < sum(map(len, texts))  # merges make it shorter than the bytes


def test_random_windows_are_consecutive_tokens():
    tokens = torch.arange(1000)
    batch = next(random_windows(tokens, batch_size=4, seq_len=16, seed=0))
    assert batch.shape == (4, 16)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token stream \(10 tokens\) is not longer than seq_len \(16\)"):
        next(random_windows(torch.arange(10), 2, 16))


def test_squad_asked_for_without_network_is_an_error_not_a_substitute(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'squad' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"--dataset squad: could not load it \(ConnectionError: Couldn't reach"):
        load_texts("squad", max_chars=10_000)


def test_bad_arguments_name_the_values():
    with pytest.raises(ValueError, match=r"dataset must be 'squad' or 'stdlib', got 'wiki'"):
        load_texts("wiki")
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be at least 257"):
        train_tokenizer(["some text"], 100)
