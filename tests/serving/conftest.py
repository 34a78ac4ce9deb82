"""Fixtures for the serving tests: a tiny tokenizer, a tiny GPT-2 folder, servers as processes."""
from __future__ import annotations

import pytest

from lessons_pkg.serving.process import ROOT, ServerProcess  # noqa: F401  (ROOT: used by the test modules)

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. Hello again, world!",
    "Tensor parallelism splits matrices; pipeline parallelism splits layers.",
    "A server answers requests: prompts in, text out. The model was trained on words.",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer_files(tmp_path_factory):
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    return train_byte_level_bpe(CORPUS, 300, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_files):
    from lessons_pkg.data.tokenizer import build_tokenizer

    return build_tokenizer(*tiny_tokenizer_files)


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory, tiny_tokenizer_files, tiny_tokenizer):
    """A transformers GPT-2 folder: 4 layers, hidden 32, 4 heads, 64 positions, our 300-token BPE."""
    from lessons_pkg.checkpoint.hf_io import save_hf_folder
    from lessons_pkg.tensor_parallel.checkpointing import master_state_dict
    from lessons_pkg.tensor_parallel.config import GPTConfig

    config = GPTConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, num_layers=4, num_attention_heads=4,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    folder = str(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")
    save_hf_folder(folder, master_state_dict(config, seed=1234), config, *tiny_tokenizer_files)
    return folder


@pytest.fixture(scope="session")
def server_factory():
    started = []

    def start(*args, **kwargs) -> ServerProcess:
        s = ServerProcess(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        s.close()


@pytest.fixture(scope="session")
def hf_greedy(tiny_gpt2_folder, tiny_tokenizer):
    """``transformers``' greedy ``generate`` on the same folder: prompt -> prompt + n token ids."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_folder).eval()
    cache = {}

    def generate(prompt: str, n: int) -> list[int]:
        if (prompt, n) not in cache:
            ids = torch.tensor([tiny_tokenizer.tokenize(prompt)])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                     pad_token_id=tiny_tokenizer.eod, eos_token_id=tiny_tokenizer.eod)
            cache[prompt, n] = out[0].tolist()
        return cache[prompt, n]

    return generate


@pytest.fixture(scope="session")
def tiny_megatron_checkpoint(tmp_path_factory, tiny_gpt2_folder):
    """The same weights as a Megatron checkpoint saved in a TP=2 x PP=2 layout (our converter)."""
    from lessons_pkg.checkpoint.convert import hf_to_megatron
    from lessons_pkg.checkpoint.reshard import Layout

    folder = str(tmp_path_factory.mktemp("megatron") / "tiny-megatron-tp2pp2")
    hf_to_megatron(tiny_gpt2_folder, folder, Layout(tp=2, pp=2), log=lambda *a: None, progress=False)
    return folder


@pytest.fixture(scope="session")
def one_rank_server(server_factory, tiny_megatron_checkpoint):
    """One server process (one rank) shared by the modules that need a plain server.

    It loads the TP=2 x PP=2 Megatron checkpoint on one rank (the loader reshards it), so every
    answer compared with transformers' (which reads the GPT-2 folder) also checks that path.
    """
    return server_factory(tiny_megatron_checkpoint)


def expected_api(hf_greedy, tokenizer, prompt: str, n: int) -> tuple[str, list[str]]:
    """Megatron's answer for a greedy request, from transformers: (text, segments)."""
    ids = hf_greedy(prompt, n)
    return tokenizer.detokenize(ids), [tokenizer.detokenize([t]) for t in ids]
