"""Shared helpers of the tensor-parallel tests: tiny configs, an HF reference, shard-wise comparison.

The single-process reference is ``transformers``' GPT-2 built from the same
full-size weights: an implementation independent of ours (Conv1D layout,
q|k|v ordering, its own attention), so a layout bug cannot hide in both.
"""
from __future__ import annotations

import dataclasses

import torch

from lessons_pkg.tensor_parallel import GPTConfig, shard_of
from lessons_pkg.tensor_parallel.hf import from_hf_state_dict, to_hf_model

# float32 throughout. The parallel model sums partial products in a different
# order (per-rank partial sums, then an all-reduce) than the single matmul of
# the reference: differences of a few float32 ulps of O(1) values, amplified
# a little through layers and softmax. 1e-5 absolute / 1e-4 relative is ~100x
# that noise and far below any real bug (a wrong shard or missing reduction
# changes values at O(1e-2) or more).
ATOL, RTOL = 1e-5, 1e-4


def tiny_config(**overrides) -> GPTConfig:
    kwargs = dict(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=16,
                  hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def padded(config: GPTConfig, sd: dict, tp: int) -> tuple[GPTConfig, dict]:
    """The config and master weights with the vocabulary padded for ``tp`` (zero dummy rows), as the model holds them."""
    vocab = config.padded_vocab_size(tp)
    word = sd["embedding.word_embeddings.weight"]
    sd = dict(sd, **{"embedding.word_embeddings.weight":
                     torch.cat([word, word.new_zeros(vocab - word.size(0), word.size(1))])})
    return dataclasses.replace(config, vocab_size=vocab), sd


def hf_reference(config: GPTConfig, sd: dict, tp: int):
    """A GPT2LMHeadModel with the padded vocabulary of ``tp``: the same function as our model, loss included."""
    cfg, psd = padded(config, sd, tp)
    return to_hf_model(psd, cfg), cfg


def hf_grads(hf_model, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The HF model's gradients converted to our master names (the conversion is linear)."""
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in hf_model.named_parameters()}
    return from_hf_state_dict(grads, cfg)


def assert_shards_close(named_params, full_reference: dict, tp_rank: int, tp_size: int, what: str,
                        name_map=lambda n: n, grads: bool = True) -> int:
    """Compare each parameter (or its .grad) with its slice of the full reference; return how many were checked."""
    count = 0
    for name, p in named_params:
        ref_full = full_reference[name_map(name)]
        mine = p.grad if grads else p.detach()
        assert mine is not None, f"{what}: {name} has no gradient"
        expected = shard_of(p, ref_full, tp_rank, tp_size)
        torch.testing.assert_close(mine, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {name}: {m}")
        count += 1
    return count
