"""Plain PyTorch references for the fused kernels: the same maths, one eager op per step.

Every compiled kernel in ``csrc/`` computes exactly what the function of the
same name here computes; the tests compare them (in float64), and the benchmark
times them against each other. Read these first: they are the specification.

Conventions shared with the kernels
-----------------------------------
* ``bias_gelu``: GeLU with the tanh approximation (Megatron-LM's ``bias_gelu``),
  applied to ``x + bias``; ``bias`` has the size of the last dimension of ``x``.
* ``scaled_masked_softmax``: ``softmax(scale * x + mask)`` over the last
  dimension. ``x`` is ``[batch, heads, sq, sk]`` or ``[batch*heads, sq, sk]``;
  the mask has one slice per batch element (or one for all) and is broadcast over
  the heads:  ``[batch | 1, 1, sq | 1, sk]`` for 4-D ``x``,
  ``[batch | 1, sq | 1, sk]`` for 3-D ``x`` (rows ``b*heads .. b*heads+heads-1``
  use mask slice ``b``), or ``[sq | 1, sk]`` for all.
  A boolean mask is ``True`` where a key must be IGNORED (Megatron's convention);
  a floating mask is ADDED to the scaled scores (``-inf`` ignores a key).
* Fully masked rows: a query row in which every key is ignored (every score
  ``-inf``) has no distribution to normalise. We define its output as all
  ZEROS (and its gradient as zero): "a query that may attend to nothing
  receives nothing", which is what Megatron's CUDA kernel returns too, and it
  keeps NaN out of the model. (``torch.softmax`` would give NaN there.)
* ``scaled_upper_triang_masked_softmax``: the causal case, ``x`` is
  ``[batch*heads, sq, sq]`` and key ``j`` is ignored for query ``i`` when
  ``j > i``. No row is fully masked.
* ``layer_norm``: over the last dimension, with affine ``weight`` and ``bias``,
  statistics computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math

import torch

# sqrt(2/pi) and the cubic coefficient of the tanh approximation of GeLU.
GELU_K0 = math.sqrt(2.0 / math.pi)  # 0.7978845608...
GELU_K1 = 0.044715


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x + bias)``: 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))), y = x + bias."""
    y = x + bias
    return 0.5 * y * (1.0 + torch.tanh(GELU_K0 * (y + GELU_K1 * y * y * y)))


def bias_gelu_backward(grad_out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """d gelu_tanh(y) / dy * grad_out, written out (what the kernel's backward computes).

    With t = tanh(k0 (y + k1 y^3)):
        d/dy = 0.5 (1 + t) + 0.5 y (1 - t^2) k0 (1 + 3 k1 y^2)
    The bias gradient is this summed over every dimension but the last.
    """
    y = x + bias
    t = torch.tanh(GELU_K0 * (y + GELU_K1 * y * y * y))
    return grad_out * (0.5 * (1.0 + t) + 0.5 * y * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * y * y))


def _mask_for(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` reshaped so that it broadcasts against ``x`` (over the heads)."""
    if x.dim() == 3 and mask.dim() == 3 and mask.size(0) not in (1, x.size(0)):
        # [batch, sq, sk] against [batch*heads, sq, sk]: repeat each slice `heads` times.
        heads = x.size(0) // mask.size(0)
        return mask.repeat_interleave(heads, dim=0)
    return mask


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax(scale * x + mask)`` over the last dim; fully masked rows give zeros (see module doc)."""
    scores = x * scale
    if mask is not None:
        mask = _mask_for(x, mask)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask
    dead = scores.amax(dim=-1, keepdim=True) == float("-inf")  # rows with nothing to attend to
    scores = scores.masked_fill(dead, 0.0)  # any finite value: keeps softmax (and its gradient) NaN-free
    return torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``softmax(scale * x)`` for ``x`` of ``[batch*heads, sq, sq]``: key j > query i is ignored."""
    sq, sk = x.shape[-2], x.shape[-1]
    future = torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(diagonal=1)
    return torch.softmax((x * scale).masked_fill(future, float("-inf")), dim=-1)


def softmax_backward(grad_out: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of ``softmax(scale * x + mask)`` w.r.t. ``x`` from the saved probabilities:
    ``scale * p * (g - sum(g * p))`` per row (masked entries have p = 0 and get 0)."""
    return scale * probs * (grad_out - (grad_out * probs).sum(dim=-1, keepdim=True))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim, step by step, statistics in float32 (float64 for float64 input)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as nn.LayerNorm
    xhat = (xf - mean) * torch.rsqrt(var + eps)
    return (xhat * weight.to(acc) + bias.to(acc)).to(x.dtype)
