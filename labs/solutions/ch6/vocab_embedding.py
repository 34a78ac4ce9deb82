"""Solution ch6.3 (what VocabParallelEmbedding.forward does before its all-reduce)."""
import torch
import torch.nn.functional as F


def partial_embedding(ids: torch.Tensor, weight_shard: torch.Tensor, start: int, end: int) -> torch.Tensor:
    outside = (ids < start) | (ids >= end)
    local = (ids - start).masked_fill(outside, 0)          # any valid row; zeroed below
    rows = F.embedding(local, weight_shard)                # [b, s] -> [b, s, h]
    return rows.masked_fill(outside.unsqueeze(-1), 0.0)
