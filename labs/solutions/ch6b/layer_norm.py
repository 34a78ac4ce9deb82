"""Solution ch6b.3. Two passes: the mean first, then the mean of squared deviations (no cancellation).
Kernels that read x once use Welford's running update, or (csrc/layer_norm.cpp) E[d^2] - E[d]^2 on
d = x - x[0]: shifted by one of the row's own values, the subtraction cancels by 1 + (x[0] - mean)^2 / var,
not by (mean / std)^2, and the kernel sums again, shifted by the mean, the rare rows where that is large."""
import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias
