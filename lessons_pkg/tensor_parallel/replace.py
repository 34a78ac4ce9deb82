"""Tensor replacement (Parallelformers' idea): shard an unmodified ``transformers`` GPT-2 in place.

Every rank loads the same full model, then :func:`parallelize` swaps each
block's four projections for this rank's shards, Megatron style::

    attn.c_attn   [h, 3h]  column-split per head: q, k and v of heads r*nh/tp .. (r+1)*nh/tp
    attn.c_proj   [h, h]   row-split (GPT-2's Conv1D stores [in, out]: rows are inputs), + all-reduce
    mlp.c_fc      [h, 4h]  column-split
    mlp.c_proj    [4h, h]  row-split, + all-reduce

and tells the attention it now has ``heads / tp`` heads. Embeddings,
LayerNorms and the LM head stay replicated, so the logits are complete on
every rank and ``model.generate`` works unchanged. The model's own forward
code runs; only its weights and two reductions per block change.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lessons_pkg.tensor_parallel.layers import resolve_tp_group
from lessons_pkg.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from lessons_pkg.tensor_parallel.utils import divide


class ColumnParallelConv1D(nn.Module):
    """GPT-2 ``Conv1D`` (``y = x W + b``, ``W [in, out]``) holding this rank's output columns."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tp_group):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous())  # [in, out/tp]
        self.bias = nn.Parameter(bias.contiguous())      # [out/tp]
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x, self.tp_group)   # f
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class RowParallelConv1D(nn.Module):
    """GPT-2 ``Conv1D`` holding this rank's input rows; the partial products are summed, then the bias added."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, tp_group):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous())  # [in/tp, out]
        self.bias = nn.Parameter(bias.contiguous())      # [out], replicated
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = torch.matmul(x, self.weight)                                   # [b, s, in/tp] -> [b, s, out]
        return reduce_from_tensor_model_parallel_region(partial, self.tp_group) + self.bias  # g, then bias once


def _heads_columns(n_embd: int, heads: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Indices of c_attn's output columns for this rank's heads, in GPT-2's ``[q | k | v]`` order."""
    per_rank = divide(heads, tp_size, what="num_attention_heads (n_head)") * (n_embd // heads)
    local = torch.arange(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    return torch.cat([part * n_embd + local for part in range(3)])


@torch.no_grad()
def parallelize(model: nn.Module, tp_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard a ``transformers`` GPT-2 (``GPT2LMHeadModel`` or ``GPT2Model``) over ``tp_group``, in place.

    Every rank must hold the same full weights when calling. ``tp_group=None``
    uses the tensor-parallel group of :mod:`lessons_pkg.parallel_state`.
    Returns the model.
    """
    tp_group, tp_size, tp_rank = resolve_tp_group(tp_group)
    transformer = getattr(model, "transformer", model)
    config = model.config
    h, heads = config.n_embd, config.n_head
    divide(4 * h if config.n_inner is None else config.n_inner, tp_size, what="the MLP's inner size")
    columns = _heads_columns(h, heads, tp_size, tp_rank)
    for block in transformer.h:
        attn, mlp = block.attn, block.mlp
        if getattr(attn, "is_cross_attention", False):
            raise NotImplementedError("cross-attention blocks are not supported")
        attn.c_attn = ColumnParallelConv1D(attn.c_attn.weight[:, columns], attn.c_attn.bias[columns], tp_group)
        rows = slice(tp_rank * (h // tp_size), (tp_rank + 1) * (h // tp_size))
        attn.c_proj = RowParallelConv1D(attn.c_proj.weight[rows], attn.c_proj.bias, tp_group)
        attn.num_heads = heads // tp_size
        attn.split_size = h // tp_size  # c_attn's output is now [q | k | v] of h/tp columns each
        attn.embed_dim = h // tp_size

        inner = mlp.c_fc.weight.size(1) // tp_size
        cols = slice(tp_rank * inner, (tp_rank + 1) * inner)
        mlp.c_fc = ColumnParallelConv1D(mlp.c_fc.weight[:, cols], mlp.c_fc.bias[cols], tp_group)
        mlp.c_proj = RowParallelConv1D(mlp.c_proj.weight[cols], mlp.c_proj.bias, tp_group)
    model.tensor_parallel_size = tp_size
    return model
