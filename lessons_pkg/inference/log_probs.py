"""Log-probabilities of chosen tokens from vocab-parallel logits, without gathering them.

Scoring a prompt needs ``log p(token_{j+1} | tokens_{<=j})`` at every position
j: logits ``[b, s, V]``, too big to gather for a long prompt and a real
vocabulary. This is the cross entropy of the training loss with the sign
flipped, computed the same way (``tensor_parallel.cross_entropy``: the global
maximum, the target's logit and the sum of exponentials, one all-reduce of a
``[b, s]`` tensor each). The vocabulary padding (dummy ids >= ``vocab_size``)
is masked out first, so the distribution is over the real vocabulary, as in
``transformers``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lessons_pkg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from lessons_pkg.tensor_parallel.utils import mask_vocab_padding


def vocab_parallel_log_probs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                             tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """``log p(targets) [b, s]`` (float32) from this rank's logits ``[b, s, V/tp]`` and global ids ``[b, s]``.

    A collective over ``tp_group``: every rank of it calls with its own slice.
    """
    tp_rank = dist.get_rank(tp_group) if dist.is_initialized() and tp_group is not None else 0
    masked = mask_vocab_padding(logits.float(), vocab_size, tp_rank)
    return -vocab_parallel_cross_entropy(masked, targets, tp_group=tp_group)
