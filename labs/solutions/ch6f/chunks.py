"""Solution ch6f.3. Chunk c holds positions [c n, (c + 1) n), n = seq_length / (2 cp); chunk i needs i + 1 pairs."""


def rank_tokens(rank: int, cp: int, seq_length: int) -> list[int]:
    n = seq_length // (2 * cp)
    return [p for c in (rank, 2 * cp - 1 - rank) for p in range(c * n, (c + 1) * n)]


def causal_chunk_pairs(rank: int, cp: int) -> int:
    return (rank + 1) + (2 * cp - 1 - rank + 1)
