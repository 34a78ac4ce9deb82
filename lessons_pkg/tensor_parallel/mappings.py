"""Communication of tensor parallelism as autograd functions: the paper's f and g, and split/gather.

Megatron-LM (Shoeybi et al., 2019) writes a tensor-parallel MLP as::

    X --f--> [X A_r] --GeLU--> [Y B_r] --g--> Z        (r = this rank)

``f`` is the identity in the forward pass and an all-reduce in the backward
pass; ``g`` is its conjugate. Each function below states its forward/backward
pair. All take the process group explicitly and do nothing on a group of one
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
