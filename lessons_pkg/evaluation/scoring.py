"""The last pipeline stage's work: per-sample log-likelihood and greedy correctness, logits never gathered.

Rank r of the tensor-parallel group holds logits ``[b, s, V_pad/tp]`` for the
ids ``[r V_pad/tp, (r+1) V_pad/tp)``. Two numbers per position are needed:

* ``-log p(label)``: :func:`lessons_pkg.tensor_parallel.vocab_parallel_cross_entropy`
  (three all-reduces of ``[b, s]``: max, target logit, sum of exponentials);
* the argmax over the whole vocabulary (:func:`vocab_parallel_argmax`): each
  rank's best value and global id, an all-reduce MAX of the values, then an
  all-reduce MIN of the ids of the ranks that hold that value, so a tie goes to
  the smallest id, as ``torch.argmax`` on the gathered logits would choose.

Megatron gathers the logits for LAMBADA (``parallel_output=False``); here the
traffic is four ``[b, s]`` tensors instead of one ``[b, s, V]``.

The dummy ids Megatron appends to pad the vocabulary (``vocab_size ..
V_pad - 1``) are not words: their logits are set to ``-inf`` first. Without that
the result would depend on the tensor-parallel size, which changes the padding
(our dummy rows are zero, so each would add ``exp(0)`` to the softmax's sum and
could even win the argmax when every real logit is negative).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.tensor_parallel import vocab_parallel_cross_entropy
from lessons_pkg.tensor_parallel.utils import mask_vocab_padding, vocab_range


def _rank_and_size(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def mask_dummy_tokens(logits: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """This rank's logits ``[b, s, V_pad/tp]`` with the padding ids' logits at ``-inf`` (see ``mask_vocab_padding``)."""
    rank, _ = _rank_and_size(tp_group)
    return mask_vocab_padding(logits, vocab_size, rank)


def vocab_parallel_argmax(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Global argmax ids ``[b, s]`` of vocab-parallel logits ``[b, s, V/tp]`` (ties: the smallest id)."""
    rank, size = _rank_and_size(tp_group)
    start, _ = vocab_range(logits.size(-1), rank)
    best, index = logits.max(dim=-1)                                   # [b, s] each: this rank's slice
    index = index + start                                              # global ids
    if size == 1:
        return index
    global_best = best.clone()
    dist.all_reduce(global_best, op=dist.ReduceOp.MAX, group=tp_group)
    candidate = torch.where(best == global_best, index, torch.full_like(index, torch.iinfo(index.dtype).max))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=tp_group)
    return candidate


def score_batch(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, vocab_size: int,
                tp_group=None) -> torch.Tensor:
    """Per sample ``[b, 3]`` float64: (sum of -log p over scored labels, scored labels, 1 if all argmax right).

    logits [b, s, V_pad/tp] this rank's slice; labels [b, s] global ids; mask [b, s] 1 where scored.
    """
    logits = mask_dummy_tokens(logits.float(), vocab_size, tp_group)
    nll = vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group)        # [b, s]
    predicted = vocab_parallel_argmax(logits, tp_group)                          # [b, s]
    scored = mask.bool()
    nll_sum = torch.where(scored, nll.double(), torch.zeros((), dtype=torch.float64)).sum(-1)  # [b]
    count = scored.sum(-1).double()                                              # [b]
    correct = ((predicted == labels) | ~scored).all(-1).double()                 # [b]: every scored token right
    return torch.stack([nll_sum, count, correct], dim=-1)                        # [b, 3]
