"""Compiled fused kernels (``csrc/``) with their plain PyTorch references.

    from lessons_pkg.kernels import bias_gelu, scaled_masked_softmax, \\
        scaled_upper_triang_masked_softmax, layer_norm

    y = bias_gelu(x, bias)                                  # gelu_tanh(x + bias), x [..., h], bias [h]
    p = scaled_masked_softmax(scores, mask, scale)          # softmax(scale*scores + mask), mask broadcast over heads
    p = scaled_upper_triang_masked_softmax(scores, scale)   # causal softmax, scores [b*heads, sq, sq]
    y = layer_norm(x, weight, bias, eps)                    # LayerNorm over the last dim, float32 statistics

Each is differentiable (``ops.py``, autograd in ``csrc/autograd.cpp``): its forward and backward
are one compiled kernel each; ``reference.py`` holds the same maths in eager PyTorch.
Importing this package compiles nothing: the C++ (and, on a CUDA machine, the
CUDA) sources are compiled on first use, once, and cached in ``build/kernels``.
``python -m lessons_pkg.kernels build`` compiles them ahead of time.

Devices and dtypes: CPU float32 and float64 (float64 is there for
``torch.autograd.gradcheck``); CUDA float32, float16 and bfloat16 (float32 arithmetic inside).
"""
from __future__ import annotations

import torch

from lessons_pkg.kernels import reference

__all__ = [
    "bias_gelu",
    "scaled_masked_softmax",
    "scaled_upper_triang_masked_softmax",
    "layer_norm",
    "reference",
]


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x + bias)`` in one fused kernel; backward gives the gradients of ``x`` and ``bias``."""
    from lessons_pkg.kernels import ops

    return ops.bias_gelu(x, bias)


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax(scale * x + mask)`` over the last dim, the mask broadcast over the heads.

    ``x``: ``[b, heads, sq, sk]`` with mask ``[b | 1, 1, sq | 1, sk]``, or
    ``[b*heads, sq, sk]`` with mask ``[b | 1, sq | 1, sk]`` (or ``[sq | 1, sk]``).
    Boolean mask: ``True`` ignores the key. Floating mask: added to the scores.
    A fully masked row (every score ``-inf``) gives zeros. ``mask=None``: no mask.
    """
    from lessons_pkg.kernels import ops

    return ops.scaled_masked_softmax(x, mask, scale)


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``softmax(scale * x)`` for ``x`` of ``[b*heads, sq, sq]``: query i ignores keys j > i."""
    from lessons_pkg.kernels import ops

    return ops.scaled_upper_triang_masked_softmax(x, scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` with affine ``weight`` and ``bias`` (float32 statistics)."""
    from lessons_pkg.kernels import ops

    return ops.layer_norm(x, weight, bias, eps)
