"""Which tokens each context-parallel rank holds: 2 cp chunks, rank r keeps chunks r and 2 cp - 1 - r.

With causal attention a token attends to every token before it, so the end of
the sequence costs the most. Cutting it into ``cp`` contiguous pieces would
give the last rank ``cp`` blocks of work and the first one. Megatron-LM cuts
it into ``2 cp`` chunks and gives rank r one from each end::

    cp = 2, chunks 0 1 2 3:    rank 0: [0, 3]    rank 1: [1, 2]
    cp = 4, chunks 0 .. 7:     rank 0: [0, 7]    rank 1: [1, 6]    rank 2: [2, 5]    rank 3: [3, 4]

so every rank holds one early and one late chunk, and every rank's queries
see the same number of keys: ``(2 cp + 1)`` chunk-pairs of work each. The
plain split (``layout="contiguous"``: rank r holds chunks ``2r, 2r + 1``, the
r-th ``s / cp`` of the sequence) is kept for comparison: its last rank does
``4 cp - 1`` chunk pairs and its first 3.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks (of ``2 cp_size``) that rank ``cp_rank`` holds, in its local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} is not within size {cp_size}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


LAYOUTS = ("balanced", "contiguous")


def rank_chunks(cp_rank: int, cp_size: int, layout: str = "balanced") -> tuple[int, int]:
    """The two chunks (of ``2 cp``) rank ``cp_rank`` holds: Megatron's balanced ones, or two adjacent ones."""
    if layout == "balanced":
        return chunk_ids(cp_rank, cp_size)
    if layout == "contiguous":
        if not 0 <= cp_rank < cp_size:
            raise ValueError(f"context-parallel rank {cp_rank} is not within size {cp_size}")
        return 2 * cp_rank, 2 * cp_rank + 1
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check(length: int, cp_size: int) -> int:
    if length % (2 * cp_size):
        raise ValueError(f"with context parallelism the sequence length ({length}) must be divisible by "
                         f"2 x context-parallel size ({2 * cp_size}): each rank holds 2 equal chunks")
    return length // (2 * cp_size)


def split_sequence(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1, layout: str = "balanced"
                   ) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim``: ``[.., s, ..] -> [.., s / cp, ..]`` (its two chunks)."""
    if cp_size == 1:
        return x
    c = _check(x.size(dim), cp_size)
    first, last = rank_chunks(cp_rank, cp_size, layout)
    return torch.cat([x.narrow(dim, first * c, c), x.narrow(dim, last * c, c)], dim=dim)


def local_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Position ids ``[1, s / cp]`` of this rank's tokens in the whole sequence of ``seq_length``."""
    return split_sequence(torch.arange(seq_length, device=device).unsqueeze(0), cp_size, cp_rank)


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1, layout: str = "balanced"
                    ) -> torch.Tensor:
    """The whole sequence from every rank's :func:`split_sequence` part (forward only: for references and logs)."""
    cp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if cp == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(cp)]
    dist.all_gather(parts, x.contiguous(), group=group)
    c = x.size(dim) // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp)
    for rank, part in enumerate(parts):
        first, last = rank_chunks(rank, cp, layout)
        chunks[first], chunks[last] = part.narrow(dim, 0, c), part.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)
