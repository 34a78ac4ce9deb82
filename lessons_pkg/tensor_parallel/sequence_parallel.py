"""Sequence parallelism: the parts of a layer that tensor parallelism leaves whole, split along the sequence.

Tensor parallelism splits the two matmul blocks of a layer (attention, MLP) over
``t`` ranks, but between them every rank holds the whole ``[b, s, h]`` residual
stream: the LayerNorms, the dropouts and the residual adds are computed ``t``
times over, and their activations are kept ``t`` times over. Korthikanti et al.
(2022, "Reducing Activation Recomputation in Large Transformer Models") split
those along the sequence: each rank keeps ``[b, s/t, h]``, its own tokens. A
LayerNorm, a dropout and an add work token by token, so nothing changes in
what they compute. The two regions meet at the matmul blocks::

    [b, s/t, h] --LN--> all-gather --> [b, s, h] --column-parallel ... row-parallel--> [b, s, h] partial
                        (backward:                                                          |
                         reduce-scatter)                                    reduce-scatter (backward: all-gather)
                                                                                            v
    [b, s/t, h] <--residual add-- dropout <---------------------------------------------- [b, s/t, h]

so the all-reduce that ended each block without sequence parallelism (``g``)
became a reduce-scatter, and the identity that began it (``f``, all-reduce in
backward) became an all-gather (reduce-scatter in backward): see
:func:`~lessons_pkg.tensor_parallel.mappings.gather_from_sequence_parallel_region`
and :func:`~lessons_pkg.tensor_parallel.mappings.reduce_scatter_to_sequence_parallel_region`.
A ring all-reduce IS a reduce-scatter followed by an all-gather, so the bytes
moved per layer are the same; the activations outside the blocks shrink ``t`` times.

Per layer the paper counts the activation bytes kept for backward (16-bit
activations, 1-byte dropout masks, ``a`` heads) as

    no parallelism        s b h (34 + 5 a s / h)
    tensor parallel       s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence     s b h (34 / t + 5 a s / (h t))        = all of it divided by t

(the 10 that tensor parallelism cannot split: two LayerNorm inputs, 4 s b h;
two dropout masks, 2 s b h; the inputs of the QKV and of the first MLP matmul,
4 s b h). ``scripts/bench_sequence_parallel.py`` measures it.

The model's other sequence-parallel pieces: the vocab-parallel embedding ends
in a reduce-scatter (each rank adds its tokens' position embeddings), the LM
head all-gathers the sequence (so vocab-parallel cross entropy sees every
token), and dropout on the split stream draws each rank's own mask
(:mod:`lessons_pkg.tensor_parallel.random`).

This module holds what the trainer needs besides the layers: parameters used
on a slice of the sequence (LayerNorm weights and biases, the row-parallel
biases, the position embedding) see only their rank's tokens, so their
gradients are partial sums, added over the tensor group after backward
(:func:`allreduce_sequence_parallel_grads`, Megatron's ``finalize_model_grads``).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lessons_pkg.tensor_parallel.mappings import (
    _gather_along_seq,
    _reduce_scatter_along_seq,
    gather_from_sequence_parallel_region,
)

__all__ = ["mark_sequence_parallel", "sequence_parallel_params", "allreduce_sequence_parallel_grads",
           "check_sequence_parallel", "local_positions", "linear_with_sequence_gather",
           "linear_with_sequence_gather_reference"]


class _LinearWithSequenceGather(torch.autograd.Function):
    """``all-gather(x) W^T + b`` that keeps only ``x``'s slice for backward (gathered again there).

    Forward: all-gather ``[b, s/t, in] -> [b, s, in]``, then the matmul. Backward:
    all-gather ``x`` again for ``dW``, and reduce-scatter ``dX = dY W`` back to
    ``[b, s/t, in]``. Saving the slice instead of the gathered ``[b, s, in]`` is
    what makes the matmul inputs count ``/ t`` in the paper's memory formula, for
    one more all-gather in backward (Megatron-LM's
    ``LinearWithGradAccumulationAndAsyncCommunication`` does the same).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)                         # x: this rank's [b, s/t, in] only
        total = _gather_along_seq(x, group)                      # [b, s/t, in] -> [b, s, in]
        return torch.nn.functional.linear(total, weight, bias)   # [b, s, in] -> [b, s, out/t]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = _gather_along_seq(x, ctx.group)                  # gathered again: [b, s, in]
        grad_total = grad.matmul(weight.to(grad.dtype))          # [b, s, out/t] -> [b, s, in] (partial sums)
        grad_x = _reduce_scatter_along_seq(grad_total, ctx.group)  # summed over ranks, this rank's tokens
        grad_weight = grad.flatten(0, -2).t().matmul(total.flatten(0, -2).to(grad.dtype))  # [out/t, in]
        grad_bias = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_weight.to(weight.dtype), grad_bias, None


def linear_with_sequence_gather(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                group: dist.ProcessGroup | None) -> torch.Tensor:
    """A column-parallel matmul on the sequence-parallel stream: ``[b, s/t, in] -> [b, s, out/t]``.

    Computes :func:`linear_with_sequence_gather_reference`, keeping ``x``'s
    slice (not the gathered sequence) for backward. Under autocast the matmul
    runs in the autocast dtype, as ``F.linear`` would.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _LinearWithSequenceGather.apply(x, weight, bias, group)
    return _LinearWithSequenceGather.apply(x, weight, bias, group)


def linear_with_sequence_gather_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                          group: dist.ProcessGroup | None) -> torch.Tensor:
    """The plain composition: ``F.linear(all-gather(x), W, b)``; autograd keeps the gathered ``[b, s, in]``."""
    return torch.nn.functional.linear(gather_from_sequence_parallel_region(x, group), weight, bias)


def mark_sequence_parallel(*params: nn.Parameter | None) -> None:
    """Tag replicated parameters that only see this rank's tokens (their gradient is partial)."""
    for p in params:
        if p is not None:
            p.sequence_parallel = True


def sequence_parallel_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters tagged by :func:`mark_sequence_parallel` in ``modules``, each once."""
    seen, out = set(), []
    for module in modules:
        for p in module.parameters():
            if getattr(p, "sequence_parallel", False) and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def allreduce_sequence_parallel_grads(modules: Iterable[nn.Module], tp_group: dist.ProcessGroup | None) -> None:
    """Sum the partial gradients of the sequence-parallel parameters over the tensor group (one all-reduce).

    After it, every tensor rank holds the gradient one process would compute on the whole sequence.
    Call it after backward and before the data-parallel reduction and the optimizer.
    """
    if tp_group is None or not dist.is_initialized() or dist.get_world_size(tp_group) == 1:
        return
    params = sequence_parallel_params(modules)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)                          # one message for every LayerNorm and bias
    dist.all_reduce(flat, group=tp_group)
    for grad, total in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(total)


def check_sequence_parallel(tp_size: int, seq_length: int | None = None) -> None:
    """Refuse what sequence parallelism cannot do, naming the values."""
    if tp_size == 1:
        raise ValueError("sequence parallelism splits the sequence over the tensor-parallel ranks: it needs "
                         "--tensor-model-parallel-size > 1, got 1 (Megatron-LM turns it off at TP=1; drop "
                         "--sequence-parallel there)")
    if seq_length is not None and seq_length % tp_size:
        raise ValueError(f"with sequence parallelism the sequence length ({seq_length}) must be divisible by the "
                         f"tensor-parallel size ({tp_size})")


def local_positions(position_ids: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's slice ``[.., s/t]`` of ``position_ids [.., s]`` (the tokens it holds)."""
    s = position_ids.size(-1)
    check_sequence_parallel(tp_size, s)
    n = s // tp_size
    return position_ids[..., tp_rank * n:(tp_rank + 1) * n]
