"""Context parallelism: one long sequence split over ranks from end to end, attention computed as a ring.

Sequence parallelism (``lessons_pkg.tensor_parallel.sequence_parallel``) splits
the tokens between the matmul blocks but gathers them for attention: every
rank still attends over the whole sequence. Context parallelism keeps each
rank's tokens everywhere, the LM head and the loss included; only attention
needs other ranks' tokens, and it gets their keys and values one rank at a
time, round a ring, combining the partial results by their log-sum-exp.

* :mod:`.split`: which tokens a rank holds (the sequence cut into ``2 cp``
  chunks, rank r keeping chunks r and ``2 cp - 1 - r``, so causal attention
  costs every rank the same), and their positions;
* :mod:`.online_softmax`: attention of a block of queries over a block of
  keys, returned with its log-sum-exp, and the rule that merges two such
  partial results into the attention over both blocks; the plain reference
  (full attention on the gathered sequence) beside them;
* :mod:`.ring_attention`: the ring itself, forward and backward, as an
  autograd function.

Megatron-LM's ``--context-parallel-size``; the process groups are in
:mod:`lessons_pkg.parallel_state` (TP innermost, then CP, then DP, PP outermost).
"""
from lessons_pkg.context_parallel.online_softmax import block_attention, full_attention, merge_partial_attention
from lessons_pkg.context_parallel.ring_attention import RingTrace, ring_attention
from lessons_pkg.context_parallel.split import chunk_ids, gather_sequence, local_positions, rank_chunks, split_sequence

__all__ = ["chunk_ids", "rank_chunks", "split_sequence", "gather_sequence", "local_positions", "block_attention",
           "merge_partial_attention", "full_attention", "ring_attention", "RingTrace"]
