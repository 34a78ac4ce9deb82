"""Exercise ch6f.2: merge two partial attention results by their log-sum-exp (the online softmax).

out_a [b, heads, q, d] is the attention of the queries over key block A alone, lse_a [b, heads, q] the log
of its softmax denominator, log(sum_j exp(score_j)); the same for block B. Return (out, lse): the attention
over both blocks, and its log-sum-exp. A query that saw no key of a block has lse = -inf there (and any
out): the result must then be the other block's. Ring attention merges one rank's block at a time this way.

Check: python -m lessons_pkg.labs check ch6f.2
"""
import torch


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    raise NotImplementedError("merge(out_a, lse_a, out_b, lse_b)")
