"""The fused kernels as differentiable ops: the arguments checked here, the autograd in C++.

Each function checks its arguments (errors that name the values) and calls
``torch.ops.lessons_kernels.<op>`` (schemas in ``csrc/ops.cpp``), whose autograd
(``csrc/autograd.cpp``, one ``torch::autograd::Function`` per op) runs the forward kernel,
saves only what the backward kernel reads, and runs the backward kernel in ``loss.backward()``.
The kernels: ``csrc/<op>.cpp`` (CPU), ``csrc/cuda/<op>.cu`` (CUDA). The maths of each is
written out in eager PyTorch in ``reference.py``.

Why not a Python ``torch.autograd.Function``: it does the same with more interpreter work per
call, about 30 us more for a LayerNorm forward+backward at the course's shape (0.3 ms in all;
``docs/benchmarks.md``), and these ops run every layer of every iteration.
"""
from __future__ import annotations

import torch

from lessons_pkg.kernels.build import NAMESPACE, load

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_OPS: dict[str, torch._ops.OpOverload] = {}


def _op(name: str) -> torch._ops.OpOverload:
    """``torch.ops.lessons_kernels.<name>``, compiling the library on first use.

    Kept once looked up (the overload itself, not the packet that picks one per call): that saves
    about 0.4 us of Python per call here, on ops that run every layer of every iteration.
    """
    op = _OPS.get(name)
    if op is None:
        load()
        op = _OPS[name] = getattr(getattr(torch.ops, NAMESPACE), name).default
    return op


def _check_dtype(name: str, t: torch.Tensor) -> None:
    supported = _CUDA_DTYPES if t.is_cuda else _CPU_DTYPES
    if t.dtype not in supported:
        raise TypeError(
            f"{name} has dtype {t.dtype} on {t.device.type}; the fused kernels support "
            f"{', '.join(str(d) for d in supported)} there (use lessons_pkg.kernels.reference otherwise)"
        )


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device or t.dtype != x.dtype:
        raise TypeError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y = gelu_tanh(x + bias)``.

    forward:  reads x and bias, writes y (one pass; ``x + bias`` is never stored).
    backward: reads grad_y and x, writes grad_x; grad_bias, the sum of grad_x over
              all rows, is accumulated in the same pass.
    """
    _check_dtype("x", x)
    _check_same("bias", bias, x)
    if bias.dim() != 1 or bias.numel() != x.size(-1):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({x.size(-1)},), the last dim of x {tuple(x.shape)}")
    return _op("bias_gelu")(x.contiguous(), bias.contiguous())


def _canonical_mask(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View ``mask`` as ``[mb, msq, sk]`` (mb in {1, batch}, msq in {1, sq}) and return it with ``heads``,
    the number of consecutive ``[sq, sk]`` slices of ``x`` that share one mask slice."""
    sq, sk = x.shape[-2:]
    n = x.numel() // (sq * sk) if x.numel() else 0  # batch * heads
    shape = tuple(mask.shape)
    if x.dim() == 4 and mask.dim() == 4:
        batch, heads = x.shape[:2]
        if mask.size(1) != 1 or mask.size(0) not in (1, batch):
            raise ValueError(f"mask {shape} must be [{batch} or 1, 1, {sq} or 1, {sk}] for x {tuple(x.shape)}")
        mask = mask.squeeze(1)
    elif x.dim() == 3 and mask.dim() == 3:
        if mask.size(0) == 0 or n % mask.size(0) != 0:
            raise ValueError(f"mask {shape}: its first dim must divide batch*heads = {n} of x {tuple(x.shape)}")
        heads = n // mask.size(0)
    elif mask.dim() == 2:
        mask, heads = mask.unsqueeze(0), max(n, 1)
    else:
        raise ValueError(f"mask {shape} does not fit x {tuple(x.shape)}: use [b,1,sq,sk] for 4-D x, [b,sq,sk] for 3-D x, or [sq,sk]")
    if mask.size(1) not in (1, sq) or mask.size(2) != sk:
        raise ValueError(f"mask {shape} must end in [{sq} or 1, {sk}] to match x {tuple(x.shape)}")
    return mask.contiguous(), heads


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``p = softmax(scale * x + mask)`` over the last dim (fully masked rows give 0).

    forward:  reads x (and the mask, shared by the heads), writes p; one row at a time,
              the scaled, masked scores never go to memory. Saves only p.
    backward: reads grad_p and p, writes ``grad_x = scale * p * (grad_p - sum(grad_p * p))``.
              The mask is a constant: it gets no gradient.
    """
    _check_dtype("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., sq, sk], got shape {tuple(x.shape)}")
    if mask is not None:
        if mask.requires_grad:
            raise ValueError("the mask is treated as a constant; pass mask.detach() (it requires grad)")
        if mask.device != x.device:
            raise TypeError(f"mask is on {mask.device} but x is on {x.device}")
        if mask.dtype != torch.bool:
            if not mask.is_floating_point():
                raise TypeError(f"mask must be bool (True = ignore) or floating (added), got {mask.dtype}")
            mask = mask.to(x.dtype)
        mask, heads = _canonical_mask(x, mask)
    else:
        heads = 1
    return _op("scaled_masked_softmax")(x.contiguous(), mask, heads, float(scale))


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal ``p = softmax(scale * x)``, ``x`` of ``[b*heads, sq, sq]``; key j > query i is ignored.

    forward:  reads only the ``j <= i`` triangle of x, writes all of p (zeros above
              the diagonal); no mask tensor exists. Saves only p.
    backward: the softmax backward of :func:`scaled_masked_softmax`, reading only the
              ``j <= i`` triangle of grad_p and p (p, hence grad_x, is 0 above it).
    """
    _check_dtype("x", x)
    if x.dim() != 3 or x.size(1) != x.size(2):
        raise ValueError(f"x must be [batch*heads, sq, sq] (square: causal), got shape {tuple(x.shape)}")
    return _op("scaled_upper_triang_masked_softmax")(x.contiguous(), float(scale))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``y = (x - mean) * rstd * weight + bias`` over the last dim, statistics in float32.

    forward:  reads x, weight, bias; writes y and the per-row mean and rstd (saved, with x and weight).
    backward: reads grad_y, x, mean, rstd, weight; writes
              ``grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with g = grad_y * weight,
              and accumulates ``grad_weight = sum(grad_y * xhat)``, ``grad_bias = sum(grad_y)`` over rows.
    """
    _check_dtype("x", x)
    _check_same("weight", weight, x)
    _check_same("bias", bias, x)
    hidden = x.size(-1)
    if weight.shape != (hidden,) or bias.shape != (hidden,):
        raise ValueError(
            f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({hidden},), "
            f"the last dim of x {tuple(x.shape)}"
        )
    return _op("layer_norm")(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps))
