"""Exercise ch6f.3: which tokens does context-parallel rank r hold?

Megatron-LM cuts each sequence of seq_length tokens into 2 x cp equal chunks and gives rank r chunk r
and chunk 2 x cp - 1 - r, so that with causal attention every rank has the same work. Return the
positions (0-based) rank r holds, in its local order (its first chunk, then its second). Also return how
many (query chunk, key chunk) pairs rank r must compute for causal attention: a query chunk needs every
key chunk before it and its own (the diagonal, masked); count each needed pair once.

Check: python -m lessons_pkg.labs check ch6f.3
"""


def rank_tokens(rank: int, cp: int, seq_length: int) -> list[int]:
    raise NotImplementedError("rank_tokens(rank, cp, seq_length)")


def causal_chunk_pairs(rank: int, cp: int) -> int:
    raise NotImplementedError("causal_chunk_pairs(rank, cp)")
