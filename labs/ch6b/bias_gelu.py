"""Exercise ch6b.1: what the fused bias-GeLU kernel computes, forward and backward.

GeLU with the tanh approximation (GPT-2's):
    gelu(y) = 0.5 y (1 + tanh(k0 (y + k1 y^3))),   k0 = sqrt(2/pi), k1 = 0.044715
Write bias_gelu(x, b) = gelu(x + b) and its backward, d gelu(x + b)/dx times dy,
by hand (no autograd: the kernel has none). The checker compares with torch's
GeLU and its autograd in float64.

Check: python -m lessons_pkg.labs check ch6b.1
"""
import math

import torch

K0, K1 = math.sqrt(2.0 / math.pi), 0.044715


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("bias_gelu(x, b)")


def bias_gelu_grad(dy: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError("bias_gelu_grad(dy, x, b)")
