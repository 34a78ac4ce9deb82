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


# float32 log-probs of a 300-token vocabulary against transformers' on the same weights: measured ~1e-6
# (summation order, attention kernels); 2e-5 is ~20x that, far below what a wrong shard or column gives
LOGPROB_ATOL = 2e-5


@pytest.fixture(scope="session")
def hf_model(tiny_gpt2_folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_folder).eval()


def hf_openai_logprobs(hf_model, tokenizer, prompt: str, n: int, k: int) -> dict:
    """OpenAI's ``logprobs`` (``echo: true``, greedy, ``n`` tokens, ``logprobs: k``) computed with transformers."""
    import torch

    from lessons_pkg.inference.tokenization import TokenText

    segment = TokenText(tokenizer).segment
    ids = tokenizer.tokenize(prompt)
    with torch.no_grad():
        tokens = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eod,
                                   eos_token_id=tokenizer.eod)[0].tolist()
        log_p = hf_model(torch.tensor([tokens])).logits[0, :-1].double().log_softmax(-1)    # [len - 1, V]
    assert tokenizer.eod not in tokens[len(ids):], "pick a prompt whose greedy continuation has no end of document"
    chosen = log_p.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()
    values, top_ids = log_p.topk(k, dim=-1)
    tops = [None]
    for j in range(len(tokens) - 1):
        top = {}
        for t, v in zip(top_ids[j].tolist() + [tokens[j + 1]], values[j].tolist() + [chosen[j]]):
            top.setdefault(segment(t), v)        # the top k, then the chosen token; the likelier of equal texts
        tops.append(top)
    texts = [segment(t) for t in tokens]
    offsets = [sum(len(s) for s in texts[:j]) for j in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [None] + chosen, "top_logprobs": tops, "text_offset": offsets}


def assert_logprobs_close(got: dict, want: dict, atol: float = LOGPROB_ATOL) -> None:
    """An answer's ``logprobs`` object against :func:`hf_openai_logprobs`: the same tokens and alternatives, close values."""
    import math

    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    for j in range(1, len(want["tokens"])):
        value, top, want_top = got["token_logprobs"][j], got["top_logprobs"][j], want["top_logprobs"][j]
        assert math.isfinite(value) and abs(value - want["token_logprobs"][j]) <= atol, (j, value)
        assert set(top) == set(want_top), f"position {j}: {sorted(top)} != {sorted(want_top)}"
        assert all(math.isfinite(top[s]) and abs(top[s] - want_top[s]) <= atol for s in want_top), (j, top, want_top)
