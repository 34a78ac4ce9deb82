"""Solution ch6e.2. Drop a token when the mass of the tokens before it (in sorted order) already exceeds p."""
import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = torch.zeros_like(mass, dtype=torch.bool)
    drop[:, 1:] = mass[:, :-1] > p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
