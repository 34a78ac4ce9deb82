"""Solution ch6b.2. Backward: scale * p * (dy - sum_j dy_j p_j), row by row; masked p = 0 get 0."""
import torch


def scaled_causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    sq, sk = scores.shape[-2:]
    future = torch.ones(sq, sk, dtype=torch.bool).triu(diagonal=1)
    z = (scores * scale).masked_fill(future, float("-inf"))
    z = z - z.amax(dim=-1, keepdim=True)          # the diagonal is never masked: the max is finite
    e = z.exp()
    return e / e.sum(dim=-1, keepdim=True)


def softmax_grad(dy: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * probs * (dy - (dy * probs).sum(dim=-1, keepdim=True))
