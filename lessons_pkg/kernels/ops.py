"""The fused kernels as autograd functions: one compiled kernel forward, one backward.

Each class calls ``torch.ops.lessons_kernels.<op>_forward`` / ``_backward``
(registered by ``csrc/ops.cpp``; CPU kernels in ``csrc/<op>.cpp``, CUDA kernels
in ``csrc/cuda/<op>.cu``) and saves for backward only what the backward kernel
reads. The maths of each is written out in eager PyTorch in ``reference.py``.
Inputs are checked here, with errors that name the values.
"""
from __future__ import annotations

import torch

from lessons_pkg.kernels.build import NAMESPACE, load

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ops():
    """``torch.ops.lessons_kernels``, compiling the library on first use."""
    load()
    return getattr(torch.ops, NAMESPACE)


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


class BiasGeLU(torch.autograd.Function):
    """``y = gelu_tanh(x + bias)``.

    forward:  reads x and bias, writes y (one pass; ``x + bias`` is never stored).
    backward: reads grad_y and x, writes grad_x; grad_bias, the sum of grad_x over
              all rows, is accumulated in the same pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        _check_dtype("x", x)
        _check_same("bias", bias, x)
        if bias.dim() != 1 or bias.numel() != x.size(-1):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({x.size(-1)},), the last dim of x {tuple(x.shape)}")
        x, bias = x.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, bias)
        return _ops().bias_gelu_forward(x, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = _ops().bias_gelu_backward(grad_y.contiguous(), x, bias)
        return grad_x, grad_bias


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


class ScaledMaskedSoftmax(torch.autograd.Function):
    """``p = softmax(scale * x + mask)`` over the last dim (fully masked rows give 0).

    forward:  reads x (and the mask, shared by the heads), writes p; one row at a time,
              the scaled, masked scores never go to memory.
    backward: reads grad_p and p, writes ``grad_x = scale * p * (grad_p - sum(grad_p * p))``.
              The mask is a constant: it gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
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
        probs = _ops().scaled_masked_softmax_forward(x.contiguous(), mask, heads, float(scale))
        ctx.save_for_backward(probs)
        ctx.scale = float(scale)
        return probs

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (probs,) = ctx.saved_tensors
        grad_x = _ops().scaled_softmax_backward(grad_p.contiguous(), probs, ctx.scale)
        return grad_x, None, None


class ScaledUpperTriangMaskedSoftmax(torch.autograd.Function):
    """Causal ``p = softmax(scale * x)``, ``x`` of ``[b*heads, sq, sq]``; key j > query i is ignored.

    forward:  reads only the ``j <= i`` triangle of x, writes all of p (zeros above
              the diagonal); no mask tensor exists.
    backward: the softmax backward of :class:`ScaledMaskedSoftmax`, reading only the
              ``j <= i`` triangle of grad_p and p (p, hence grad_x, is 0 above it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        _check_dtype("x", x)
        if x.dim() != 3 or x.size(1) != x.size(2):
            raise ValueError(f"x must be [batch*heads, sq, sq] (square: causal), got shape {tuple(x.shape)}")
        probs = _ops().scaled_upper_triang_masked_softmax_forward(x.contiguous(), float(scale))
        ctx.save_for_backward(probs)
        ctx.scale = float(scale)
        return probs

    @staticmethod
    def backward(ctx, grad_p: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return _ops().scaled_upper_triang_masked_softmax_backward(grad_p.contiguous(), probs, ctx.scale), None


class LayerNorm(torch.autograd.Function):
    """``y = (x - mean) * rstd * weight + bias`` over the last dim, statistics in float32.

    forward:  reads x, weight, bias; writes y and the per-row mean and rstd (saved).
    backward: reads grad_y, x, mean, rstd, weight; writes
              ``grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with g = grad_y * weight,
              and accumulates ``grad_weight = sum(grad_y * xhat)``, ``grad_bias = sum(grad_y)`` over rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        _check_dtype("x", x)
        _check_same("weight", weight, x)
        _check_same("bias", bias, x)
        hidden = x.size(-1)
        if weight.shape != (hidden,) or bias.shape != (hidden,):
            raise ValueError(
                f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must both be ({hidden},), "
                f"the last dim of x {tuple(x.shape)}"
            )
        x, weight = x.contiguous(), weight.contiguous()
        y, mean, rstd = _ops().layer_norm_forward(x, weight, bias.contiguous(), float(eps))
        ctx.save_for_backward(x, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        # the kernel sums grad_weight and grad_bias over the rows itself (no extra op per call)
        grad_x, grad_w, grad_b = _ops().layer_norm_backward(grad_y.contiguous(), *ctx.saved_tensors)
        return grad_x, grad_w, grad_b, None
