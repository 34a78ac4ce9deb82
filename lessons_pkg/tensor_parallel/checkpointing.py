"""Full-size master weights of ParallelGPT: build them from a seed, cut a rank's shard, glue shards back.

The full ("master") state dict is what a TP=1 model with the unpadded
vocabulary would hold, keyed by global layer numbers::

    embedding.word_embeddings.weight       [vocab_size, h]   (real vocabulary, no dummy rows)
    embedding.position_embeddings.weight   [max_positions, h]
    layers.{i}.input_layernorm.{weight,bias}
    layers.{i}.self_attention.query_key_value.{weight [3h, h], bias [3h]}  (rows head by head: q k v)
    layers.{i}.self_attention.dense.{weight [h, h], bias [h]}
    layers.{i}.post_attention_layernorm.{weight,bias}
    layers.{i}.mlp.dense_h_to_4h.{weight [4h, h], bias [4h]}
    layers.{i}.mlp.dense_4h_to_h.{weight [h, 4h], bias [h]}
    final_layernorm.{weight,bias}

A parameter tagged ``tensor_model_parallel`` is cut along its ``partition_dim``
into tp equal slices; the word embedding is first padded with zero rows (the
dummy tokens) up to the padded vocabulary size. Gluing drops the dummy rows
again, so the master state dict does not depend on the tensor-parallel size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.tensor_parallel.config import GPTConfig


def master_state_dict(config: GPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """Full-size initial weights drawn from ``seed`` (Megatron's scheme); identical for any TP or PP."""
    gen = torch.Generator().manual_seed(seed)
    h, std = config.hidden_size, config.init_method_std
    out_std = std / (2.0 * config.num_layers) ** 0.5  # as scaled_init_method_normal: output projections

    def normal(*shape, s=std):
        return torch.randn(*shape, generator=gen) * s

    sd = {
        "embedding.word_embeddings.weight": normal(config.vocab_size, h),
        "embedding.position_embeddings.weight": normal(config.max_position_embeddings, h),
    }
    for i in range(config.num_layers):
        p = f"layers.{i}."
        sd |= {
            p + "input_layernorm.weight": torch.ones(h), p + "input_layernorm.bias": torch.zeros(h),
            p + "self_attention.query_key_value.weight": normal(3 * h, h),
            p + "self_attention.query_key_value.bias": torch.zeros(3 * h),
            p + "self_attention.dense.weight": normal(h, h, s=out_std),
            p + "self_attention.dense.bias": torch.zeros(h),
            p + "post_attention_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.bias": torch.zeros(h),
            p + "mlp.dense_h_to_4h.weight": normal(4 * h, h), p + "mlp.dense_h_to_4h.bias": torch.zeros(4 * h),
            p + "mlp.dense_4h_to_h.weight": normal(h, 4 * h, s=out_std), p + "mlp.dense_4h_to_h.bias": torch.zeros(h),
        }
    sd |= {"final_layernorm.weight": torch.ones(h), "final_layernorm.bias": torch.zeros(h)}
    return sd


def shard_of(param: torch.Tensor, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of ``full`` that ``param`` (a parameter of rank ``tp_rank``) holds.

    Pads ``full`` with zero rows first when it has fewer rows than
    ``param.size(0) * tp_size`` along the partition (the padded vocabulary).
    """
    if not getattr(param, "tensor_model_parallel", False):
        if full.shape != param.shape:
            raise ValueError(f"replicated parameter has shape {tuple(param.shape)}, master {tuple(full.shape)}")
        return full
    dim = param.partition_dim
    n = param.size(dim)
    if full.size(dim) < n * tp_size:  # pad the vocabulary with dummy rows
        pad_shape = list(full.shape)
        pad_shape[dim] = n * tp_size - full.size(dim)
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    if full.size(dim) != n * tp_size:
        raise ValueError(f"master weight has {full.size(dim)} entries along dim {dim}, but {tp_size} ranks of "
                         f"{n} each hold {n * tp_size}")
    return full.narrow(dim, tp_rank * n, n)


def gather_full(param: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Glue the tp shards of ``param`` into the full weight along its ``partition_dim`` (a collective)."""
    p = param.detach()
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if not getattr(param, "tensor_model_parallel", False) or world == 1:
        return p.clone()
    parts = [torch.empty_like(p) for _ in range(world)]
    dist.all_gather(parts, p.contiguous(), group=tp_group)
    return torch.cat(parts, dim=param.partition_dim)  # tp x [n, ...] -> [tp * n, ...] (dim 0 shown)


def pad_word_embeddings(full: dict[str, torch.Tensor], padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """A copy of ``full`` whose word embedding has zero rows appended up to ``padded_vocab_size``.

    With it, a single-process model of vocabulary ``padded_vocab_size`` (e.g. a
    GPT2LMHeadModel) computes exactly what the tensor-parallel model computes,
    dummy tokens included.
    """
    key = "embedding.word_embeddings.weight"
    word = full[key]
    if padded_vocab_size < word.size(0):
        raise ValueError(f"padded_vocab_size ({padded_vocab_size}) is smaller than the vocabulary ({word.size(0)})")
    return dict(full, **{key: torch.cat([word, word.new_zeros(padded_vocab_size - word.size(0), word.size(1))])})
