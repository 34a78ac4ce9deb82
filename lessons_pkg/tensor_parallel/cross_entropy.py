"""Cross entropy over vocab-parallel logits, without ever gathering the ``[b, s, V]`` logits.

Rank r holds logits ``[b, s, V/tp]`` for the ids ``[r V/tp, (r+1) V/tp)``.
The per-token loss ``log(sum_v exp(z_v)) - z_target`` needs three numbers that
span the whole vocabulary, each obtained with one all-reduce of a ``[b, s]``
tensor (instead of an all-gather of ``[b, s, V]``):

1. the maximum logit (all-reduce MAX), subtracted for numerical stability;
2. the target's logit, found on exactly one rank (all-reduce SUM of zeros elsewhere);
3. the sum of exponentials (all-reduce SUM).

Label smoothing ``eps`` (as in :func:`torch.nn.functional.cross_entropy`)
mixes in the mean of ``-log p`` over the whole vocabulary, which needs a fourth
all-reduce (the sum of the logits). The gradient with respect to the logits is
``softmax - (1 - eps) onehot(target) - eps / V``, computed from the softmax
kept from the forward pass. A target equal to ``ignore_index`` (if given)
gets loss 0 and gradient 0, as in ``F.cross_entropy``; any other target
outside the (padded) vocabulary is an error.

:func:`cross_entropy` is what the trainer calls: this function when the
vocabulary is split, ``F.cross_entropy`` when one rank holds all of it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg.tensor_parallel.mappings import _all_reduce
from lessons_pkg.tensor_parallel.utils import check_token_ids, vocab_range


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, label_smoothing, group, ignore_index):
        # logits [b, s, V/tp] (this rank's vocabulary slice), target [b, s] (global ids)
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        partition = logits.size(-1)
        vocab_size = partition * world

        # (1) the global maximum, subtracted out of place: the caller's logits stay untouched
        logits_max = logits.max(dim=-1).values                                   # [b, s]
        logits_max = _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)                              # [b, s, V/tp]

        # (2) the target's logit: looked up on the rank owning the id, zero on the others
        start, end = vocab_range(partition, rank)
        ignored = torch.zeros_like(target, dtype=torch.bool) if ignore_index is None else target == ignore_index
        outside = (target < start) | (target >= end) | ignored                  # [b, s]
        local_target = (target - start).masked_fill(outside, 0)
        predicted = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # [b, s]
        predicted = predicted.masked_fill(outside, 0.0)
        predicted = _all_reduce(predicted, group)

        # (3) the sum of exponentials over the whole vocabulary
        exp_logits = shifted.exp()                                               # [b, s, V/tp]
        sum_exp = exp_logits.sum(dim=-1)                                         # [b, s]
        sum_exp = _all_reduce(sum_exp, group)

        loss = sum_exp.log() - predicted                                         # [b, s]: -log p(target)
        if label_smoothing > 0:
            # mean over all V of -log p_v = log(sum_exp) - mean_v(shifted_v)
            sum_shifted = shifted.sum(dim=-1)                                    # [b, s]
            sum_shifted = _all_reduce(sum_shifted, group)
            mean_neg_log_p = sum_exp.log() - sum_shifted / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_log_p

        loss = loss.masked_fill(ignored, 0.0)
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))                         # reuse the buffer
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        ctx.backward_done = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # grad_loss [b, s]; d loss / d z_v = softmax_v - (1 - eps) [v == target] - eps / V
        if ctx.backward_done:
            raise RuntimeError("vocab_parallel_cross_entropy reuses its saved softmax as the gradient: "
                               "its backward can run only once (do not use retain_graph=True through it)")
        ctx.backward_done = True
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax                                                           # in place: saves [b, s, V/tp]
        hit = (1.0 - ctx.label_smoothing) * (~outside).to(grad.dtype)            # 0 where the target is elsewhere
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        if ctx.label_smoothing > 0:
            grad.sub_(ctx.label_smoothing / ctx.vocab_size)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None


def _check_arguments(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float, tp_group,
                     ignore_index: int | None, what: str):
    """The tensor-parallel group to use (``None``: :mod:`lessons_pkg.parallel_state`'s) and its size,
    after checking the arguments (errors name the values)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} "
                         "must agree on every dimension but the last")
    if tp_group is None:
        from lessons_pkg.tensor_parallel.layers import resolve_tp_group

        tp_group = resolve_tp_group(None)[0]
    world = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    check_token_ids(target, logits.size(-1) * world, f"{what} target", ignore_index)
    return tp_group, world


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                 label_smoothing: float = 0.0, tp_group: dist.ProcessGroup | None = None,
                                 ignore_index: int | None = None) -> torch.Tensor:
    """Per-token loss ``[b, s]`` from this rank's logits ``[b, s, V/tp]`` and global target ids ``[b, s]``.

    Equal to ``F.cross_entropy(all_gathered_logits, target, reduction="none",
    label_smoothing=label_smoothing[, ignore_index=ignore_index])`` without gathering. ``tp_group=None``
    uses the tensor-parallel group of :mod:`lessons_pkg.parallel_state` (or a
    single process). The caller's logits are not modified.
    """
    tp_group, _ = _check_arguments(vocab_parallel_logits, target, label_smoothing, tp_group, ignore_index,
                                   "vocab_parallel_cross_entropy")
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, label_smoothing, tp_group, ignore_index)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  tp_group: dist.ProcessGroup | None = None, ignore_index: int | None = None) -> torch.Tensor:
    """The training loss ``[b, s]``: :func:`vocab_parallel_cross_entropy` when the vocabulary is split
    over several ranks; when one rank holds all of it (TP=1), PyTorch's ``F.cross_entropy``: the same
    numbers (tests/tensor_parallel checks that they agree) from one fused log-softmax + NLL kernel
    instead of the five passes over ``[b, s, V]`` that the vocabulary-parallel version makes to stay
    correct across ranks (see ``scripts/bench_trainer.py`` and docs/benchmarks.md for the trainer).
    """
    tp_group, world = _check_arguments(logits, target, label_smoothing, tp_group, ignore_index, "cross_entropy")
    if world > 1:
        return _VocabParallelCrossEntropy.apply(logits, target, label_smoothing, tp_group, ignore_index)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none",
                           label_smoothing=label_smoothing, ignore_index=-100 if ignore_index is None else ignore_index)
    return loss.view(target.shape)                                               # [b*s] -> [b, s]
