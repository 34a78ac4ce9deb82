"""Log-probabilities from vocab-parallel logits, without gathering them: of the chosen tokens, and the top k.

Scoring a prompt needs ``log p(token_{j+1} | tokens_{<=j})`` at every position
j: logits ``[b, s, V]``, too big to gather for a long prompt and a real
vocabulary. This is the cross entropy of the training loss with the sign
flipped, computed the same way (``tensor_parallel.cross_entropy``: the global
maximum, the target's logit and the sum of exponentials, one all-reduce of a
``[b, s]`` tensor each). The vocabulary padding (dummy ids >= ``vocab_size``)
is masked out first, so the distribution is over the real vocabulary, as in
``transformers``.

The k most likely tokens at each position (OpenAI's ``logprobs: k``) need no
gather of the logits either: the global top k is among the union of every
rank's own top k, so each rank sends only ``[b, s, k]`` candidates::

    rank r: logits [b, s, V/tp]  ->  local top k (values, ids + r V/tp)  [b, s, k]
    all-gather the candidates                                             [b, s, tp k]
    top k of the candidates - log Z                                       [b, s, k]

``log Z`` is the cross entropy's own normaliser (same operations on the same
numbers), so a token's value in the top k is bit for bit its log-probability
from :func:`vocab_parallel_log_probs`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from lessons_pkg.tensor_parallel.utils import mask_vocab_padding


def _rank_and_size(tp_group) -> tuple[int, int]:
    if dist.is_initialized() and tp_group is not None:
        return dist.get_rank(tp_group), dist.get_world_size(tp_group)
    return 0, 1


def vocab_parallel_log_probs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                             tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """``log p(targets) [b, s]`` (float32) from this rank's logits ``[b, s, V/tp]`` and global ids ``[b, s]``.

    A collective over ``tp_group``: every rank of it calls with its own slice.
    """
    tp_rank = dist.get_rank(tp_group) if dist.is_initialized() and tp_group is not None else 0
    masked = mask_vocab_padding(logits.float(), vocab_size, tp_rank)
    return -vocab_parallel_cross_entropy(masked, targets, tp_group=tp_group)


def vocab_parallel_top_log_probs(logits: torch.Tensor, k: int, vocab_size: int,
                                 tp_group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens at every position: ``(log p [b, s, k] float32, global ids [b, s, k])``, best first.

    A collective over ``tp_group`` (two all-reduces of ``[b, s]``, one
    all-gather of ``[b, s, 2k]``); every rank gets the same answer.
    """
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={vocab_size}], got {k}")
    tp_rank, tp_size = _rank_and_size(tp_group)
    masked = mask_vocab_padding(logits.float(), vocab_size, tp_rank)           # [b, s, V/tp], padding -inf
    partition = masked.size(-1)

    # log Z exactly as the cross entropy computes it: the global max, then the sum of exp(z - max)
    logits_max = masked.max(dim=-1).values                                     # [b, s]
    if tp_size > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = masked - logits_max.unsqueeze(-1)                                # [b, s, V/tp]
    sum_exp = shifted.exp().sum(dim=-1)                                        # [b, s]
    if tp_size > 1:
        dist.all_reduce(sum_exp, group=tp_group)

    # this rank's candidates, then the best k of every rank's candidates
    values, ids = shifted.topk(min(k, partition), dim=-1)                      # [b, s, k]
    ids = ids + tp_rank * partition                                            # global ids
    if tp_size > 1:
        # one all-gather: values and ids side by side in float64 (ids < 2**53 are exact)
        mine = torch.cat((values.double(), ids.double()), dim=-1).contiguous()  # [b, s, 2k]
        parts = [torch.empty_like(mine) for _ in range(tp_size)]
        dist.all_gather(parts, mine, group=tp_group)
        n = values.size(-1)
        values = torch.cat([p[..., :n] for p in parts], dim=-1).float()        # [b, s, tp k], exact round trip
        ids = torch.cat([p[..., n:] for p in parts], dim=-1).long()
        values, best = values.topk(k, dim=-1)                                  # [b, s, k]
        ids = ids.gather(-1, best)
    return values - sum_exp.log().unsqueeze(-1), ids
