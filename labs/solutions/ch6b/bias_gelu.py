"""Solution ch6b.1. With t = tanh(k0 (y + k1 y^3)): gelu'(y) = 0.5 (1 + t) + 0.5 y (1 - t^2) k0 (1 + 3 k1 y^2)."""
import math

import torch

K0, K1 = math.sqrt(2.0 / math.pi), 0.044715


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = x + b
    return 0.5 * y * (1.0 + torch.tanh(K0 * (y + K1 * y ** 3)))


def bias_gelu_grad(dy: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    y = x + b
    t = torch.tanh(K0 * (y + K1 * y ** 3))
    return dy * (0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * K0 * (1.0 + 3.0 * K1 * y * y))
