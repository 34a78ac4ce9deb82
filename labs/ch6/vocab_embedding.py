"""Exercise ch6.3: one rank's part of a vocab-parallel embedding lookup.

Rank r holds rows [start, end) of the embedding table (``weight_shard`` is
[end - start, h]). Return, for ids [b, s], a tensor [b, s, h] holding the row
of every id this rank owns and zeros for the ids other ranks own. The checker
sums the ranks' results (the all-reduce g) and compares with F.embedding on
the full table, and checks the gradient of each shard (float64, 2 ranks).
Careful: F.embedding must never see an index outside the shard.

Check: python -m lessons_pkg.labs check ch6.3
"""
import torch
import torch.nn.functional as F


def partial_embedding(ids: torch.Tensor, weight_shard: torch.Tensor, start: int, end: int) -> torch.Tensor:
    raise NotImplementedError("partial_embedding(ids, weight_shard, start, end)")
