"""What happens to gradients between ``backward`` and the optimizer update, in a 3-D parallel job.

1. **Tied embeddings** (``allreduce_embedding_grads``): with PP > 1 the word
   embedding lives on the first stage and a copy (the output layer) on the last;
   each gets only its own part of the gradient, so the two are summed over the
   embedding group and both copies take the same step.
2. **Data parallelism** (``allreduce_data_parallel_grads``): each data-parallel
   replica saw different samples; the mean of their gradients is the gradient
   of the whole global batch. (ZeRO-1 reduce-scatters instead: see
   :mod:`lessons_pkg.training.distributed_optimizer`.)
3. **Global norm** (``global_grad_norm``): the norm of the FULL model's gradient,
   each element counted once. A tensor-parallel shard counts on its rank; a
   replicated parameter (LayerNorm, the row-parallel bias) only on tensor rank 0;
   the last stage's copy of the embedding not at all. Squares are summed over
   the tensor group, then over the pipeline group: the same number on every rank.
4. **Clipping** (``clip_grads``): scale every gradient by ``max_norm / norm`` when
   the norm exceeds ``max_norm``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def ensure_grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The ``.grad`` of each parameter, zeros for one that received none (so every rank sends alike)."""
    for p in params:
        if p.grad is None:  # e.g. a parameter that took no part in this stage's computation
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def allreduce_embedding_grads(shared_weights: list[torch.nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Sum the gradient of the tied word embedding between the first and the last pipeline stage."""
    if group is None or not shared_weights or dist.get_world_size(group) == 1:
        return
    for weight in shared_weights:
        dist.all_reduce(ensure_grads([weight])[0], group=group)


def allreduce_data_parallel_grads(params: list[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
    """Average every gradient over the data-parallel group, with ONE all-reduce of a flat buffer."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    grads = ensure_grads(params)
    flat = _flatten_dense_tensors(grads)            # [sum of numels]: one message instead of one per tensor
    flat.div_(world)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def counts_in_norm(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank's copy of ``param`` enters the global gradient norm (each element exactly once)."""
    if getattr(param, "shared", False):  # the last stage's copy of the tied embedding
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def sum_across_model_parallel(value: torch.Tensor, tp_group, pp_group) -> torch.Tensor:
    """Sum a scalar over the tensor group, then over the pipeline group (all ranks of one model replica)."""
    for group in (tp_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
    return value


def global_grad_norm(params: list[torch.nn.Parameter], tp_rank: int, tp_group, pp_group) -> float:
    """L2 norm of the whole model's gradient (every shard of every stage, replicas counted once)."""
    counted = [p.grad for p in params if p.grad is not None and counts_in_norm(p, tp_rank)]
    squares = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    if counted:  # one norm kernel per group of tensors (torch's clip_grad_norm_ does the same), then their squares
        norms = torch._foreach_norm([g if g.dtype == torch.float32 else g.float() for g in counted])
        squares = torch.stack(norms).pow(2).sum()
    return sum_across_model_parallel(squares, tp_group, pp_group).sqrt().item()


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Megatron's factor: ``max_norm / (norm + 1e-6)`` when it is below 1, else 1 (0 disables clipping)."""
    if max_norm <= 0:
        return 1.0
    coeff = max_norm / (norm + 1.0e-6)
    return coeff if coeff < 1.0 else 1.0


def clip_grads(grads: list[torch.Tensor], norm: float, max_norm: float) -> None:
    coeff = clip_coefficient(norm, max_norm)
    if coeff < 1.0:
        torch._foreach_mul_(grads, coeff)
