"""Exercise ch6e.2: the filters behind sampling (generate.py's --top_k and --top_p).

logits [b, V]. top_k_filter keeps the k largest logits of each row (ties at
the k-th kept) and sets the others to -inf. top_p_filter keeps the most likely
tokens until their probability mass exceeds p, the token that crosses p
included (so the most likely token always stays), and sets the rest to -inf.
Kept logits are returned unchanged.

Check: python -m lessons_pkg.labs check ch6e.2
"""
import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    raise NotImplementedError("top_k_filter(logits, k)")


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    raise NotImplementedError("top_p_filter(logits, p)")
