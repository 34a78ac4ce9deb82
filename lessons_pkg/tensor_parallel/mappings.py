"""Communication of tensor parallelism as autograd functions: f and g, split/gather, the sequence-parallel pair.

Megatron-LM (Shoeybi et al., 2019) writes a tensor-parallel MLP as::

    X --f--> [X A_r] --GeLU--> [Y B_r] --g--> Z        (r = this rank)

``f`` is the identity in the forward pass and an all-reduce in the backward
pass; ``g`` is its conjugate. With sequence parallelism (the end of this file)
the activations between the blocks hold ``[b, s/tp, h]``, and f and g become
an all-gather along the sequence (backward: reduce-scatter) and a
reduce-scatter (backward: all-gather). Each function below states its
forward/backward pair. All take the process group explicitly and do nothing on a group of one
rank, so a model built with TP=1 runs without communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.tensor_parallel.utils import split_tensor_along_last_dim


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``x`` reduced over ``group`` (in place when contiguous; use the result); ``x`` itself on one rank.

    The one all-reduce of the tensor-parallel code: the mappings below and the
    vocab-parallel cross entropy (MAX and SUM) call it.
    """
    if _world_size(group) == 1:
        return x
    x = x.contiguous()  # a fresh buffer when x is a view; all_reduce works in place
    dist.all_reduce(x, op=op, group=group)
    return x


def _split_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = _world_size(group)
    if world == 1:
        return x
    return split_tensor_along_last_dim(x, world)[dist.get_rank(group)].contiguous()


def _gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = _world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)  # [..., n] x world -> [..., n * world]


class _CopyToModelParallelRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # clone: autograd may hand the same gradient tensor to several branches (a residual add does),
        # and the all-reduce works in place
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """g: forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)  # clone: the caller's partial sums stay as they were

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dimension. Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather along the last dimension. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The paper's **f**: forward identity, backward all-reduce (sum) over ``group``.

    Put it where a replicated activation enters a column-parallel layer: every
    rank's partial gradient with respect to that activation is summed. On one
    rank it is the identity both ways and returns ``x`` itself: no autograd
    node, no copy of the gradient.
    """
    if _world_size(group) == 1:
        return x
    return _CopyToModelParallelRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The paper's **g**: forward all-reduce (sum) over ``group``, backward identity.

    Put it where the partial sums of a row-parallel layer become the full output.
    The input is not modified. On one rank the sum is ``x`` itself, returned as
    it is (no autograd node, no copy).
    """
    if _world_size(group) == 1:
        return x
    return _ReduceFromModelParallelRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: ``[..., n] -> [..., n / tp]`` (this rank's slice). Backward: all-gather ``[..., n / tp] -> [..., n]``."""
    return _ScatterToModelParallelRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: all-gather ``[..., n / tp] -> [..., n]``. Backward: keep this rank's slice of the gradient."""
    return _GatherFromModelParallelRegion.apply(x, group)


# --- sequence parallelism (Korthikanti et al., 2022): the sequence dimension is dim 1 of [b, s, h] --------
def _all_gather_into_tensor(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """``dist.all_gather_into_tensor`` (renamed ``all_gather_single`` in torch 2.13, where the old name warns)."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_tensor(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """``dist.reduce_scatter_tensor`` (``reduce_scatter_single`` from torch 2.13 on)."""
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


def _gather_along_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, s/tp, ...]`` on each rank -> ``[b, s, ...]``, rank r's tokens at ``[r s/tp, (r+1) s/tp)``."""
    world = _world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.size(0), *x.shape[1:]), dtype=x.dtype, device=x.device)  # [tp b, s/tp, ...]
    _all_gather_into_tensor(out, x, group)                                  # rank r's block: rows r b .. (r+1) b
    out = out.view(world, *x.shape)                                         # [tp, b, s/tp, ...]
    return out.movedim(0, 1).flatten(1, 2)                                  # [b, tp, s/tp, ...] -> [b, s, ...]


def _reduce_scatter_along_seq(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, s, ...]`` partial sums on each rank -> this rank's ``[b, s/tp, ...]`` of their sum."""
    world = _world_size(group)
    if world == 1:
        return x
    b, s = x.shape[:2]
    if s % world:
        raise ValueError(f"sequence length {s} is not divisible by the tensor-parallel size {world}")
    chunks = x.reshape(b, world, s // world, *x.shape[2:]).movedim(1, 0).contiguous()  # [tp, b, s/tp, ...]
    out = torch.empty(chunks.shape[1:], dtype=x.dtype, device=x.device)              # [b, s/tp, ...]
    _reduce_scatter_tensor(out, chunks.flatten(0, 1), group)   # block r (tokens of rank r) -> rank r
    return out


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter the gradient (sum, this rank's tokens)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_along_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along_seq(grad, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter (sum, keep this rank's tokens). Backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_along_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_seq(grad, ctx.group), None


def gather_from_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sequence parallelism's **f**: forward all-gather ``[b, s/tp, h] -> [b, s, h]``, backward reduce-scatter.

    Where a column-parallel layer (or the LM head) reads the sequence-parallel
    stream: it needs every token, and each rank's gradient with respect to its
    input is a partial sum over its output columns; the reduce-scatter sums
    those and hands each rank its own tokens' part. An all-reduce is a
    reduce-scatter plus an all-gather, so f's all-reduce (backward) became the
    reduce-scatter here and the all-gather moved to the forward: the same bytes.
    """
    if _world_size(group) == 1:
        return x
    return _GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sequence parallelism's **g**: forward reduce-scatter ``[b, s, h] -> [b, s/tp, h]``, backward all-gather.

    Where a row-parallel layer (or the vocab-parallel embedding) ends: the
    ranks' partial sums are added and each keeps only its slice of the
    sequence, instead of every rank keeping the whole sum (g's all-reduce).
    """
    if _world_size(group) == 1:
        return x
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
