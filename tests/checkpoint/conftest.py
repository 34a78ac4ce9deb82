import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_testing

from ckpt_testing import write_trained_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tp2pp2(tmp_path_factory):
    """A TP=2 x PP=2 checkpoint written by the trainer's save_checkpoint after two AdamW steps (iteration 2)."""
    return write_trained_checkpoint(tmp_path_factory.mktemp("tp2pp2"), tp=2, pp=2)


@pytest.fixture(scope="session")
def gpt2_2000(tmp_path_factory):
    """A GPT-2 initialised by transformers, with a 2000-token BPE (not a multiple of 128) trained locally.

    The folder holds what transformers 5 writes (config.json, model.safetensors) and the tokenizer's
    vocab.json and merges.txt. Returns ``(folder, model)``.
    """
    import itertools

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lessons_pkg.data.python_docs import stdlib_docstrings
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    folder = tmp_path_factory.mktemp("gpt2-2000") / "gpt2"
    vocab, _ = train_byte_level_bpe(itertools.islice(stdlib_docstrings(), 3000), 2000, str(folder))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=2000, n_positions=64, n_embd=64, n_layer=4, n_head=4, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return str(folder), model
