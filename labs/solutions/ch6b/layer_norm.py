"""Solution ch6b.3. Two passes: the mean first, then the mean of squared deviations (no cancellation).
(Kernels that must read x once use Welford's running update, which is as stable.)"""
import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias
