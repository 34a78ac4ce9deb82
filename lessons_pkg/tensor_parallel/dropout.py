"""Dropout whose mask costs a quarter of ``F.dropout``'s on this course's CPU: 15 random bits per element.

    y = x * keep / (1 - p')        keep ~ Bernoulli(1 - p'),  p' = round(p * 2^15) / 2^15

On the CPU, ``F.dropout`` draws its mask with ``bernoulli_``: on the course's AMD EPYC, one call of the
Mersenne-Twister generator and a float comparison per element, about 6 ns each (PyTorch builds with
MKL can take a vectorised path on Intel CPUs; measure there before relying on this). With
attention dropout on the ``[b, heads, s, s]`` probabilities that is 13% of a training
iteration of the course's GPT (``torch.profiler``; docs/benchmarks.md). Here one call of
``random_`` on an int64 gives 63 random bits, four 15-bit numbers u (the one always-0 bit is the
top bit of one of the four 16-bit lanes; every lane is masked to its low 15 bits), and
``keep = u >= round(p * 2^15)``. The keep probability is then ``1 - p'``, within ``2^-16`` (1.5e-5)
of ``1 - p``, and the kept values are scaled by ``1 / (1 - p')``, not ``1 / (1 - p)``, so
``E[y] = x`` up to the rounding of that scale to x's dtype (about 1e-7 in float32; in bfloat16 up to
0.2%, exactly as for ``F.dropout``, whose scale is rounded the same way). As in ``F.dropout``, x is
multiplied by the noise ``keep / (1 - p')`` in x's dtype (so a NaN stays NaN even where dropped),
and the noise is what backward keeps. (``torch.where(keep, x, 0)`` would keep a one-byte mask
instead, but its CPU kernel is not vectorised: it costs twice a multiply.)

Only where ``|p' - p| <= 0.2% p`` (always for ``0.0077 <= p < 0.99998``, every rate in use) and only on
the CPU; elsewhere, and for ``p`` = 1, it is ``F.dropout``: on a GPU ``F.dropout`` is one fused
kernel with a counter-based generator already.

The mask comes from the default generator of the tensor's device, like ``F.dropout``'s: ranks
seeded alike draw the same mask, checkpoints that save the generator state resume the same stream.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["dropout", "keep_mask", "quantized_drop_probability"]

BITS = 15
LEVELS = 1 << BITS            # u takes the values 0 .. 2^15 - 1
MAX_RELATIVE_ERROR = 0.002    # |p' - p| / p allowed for the 15-bit path (else F.dropout)


def quantized_drop_probability(p: float) -> float:
    """``p'``: the drop probability the 15-bit mask realises for ``p``."""
    return round(p * LEVELS) / LEVELS


def _quantization_fits(p: float) -> bool:
    if not 0.0 < p < 1.0:  # also False for NaN
        return False
    q = quantized_drop_probability(p)
    return 0.0 < q < 1.0 and abs(q - p) <= MAX_RELATIVE_ERROR * p


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``bool`` tensor of ``shape``, each element True with probability ``1 - p'`` (independently)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(generator=generator)                          # uniform on [0, 2^63): 63 random bits each
    u = words.view(torch.int16)[:numel].bitwise_and_(LEVELS - 1)  # 4 per word, 15 bits each: [0, 2^15)
    return torch.ge(u, round(p * LEVELS)).view(shape)            # P(u >= k) = 1 - k / 2^15 = 1 - p'


def dropout(x: torch.Tensor, p: float, training: bool = True, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Inverted dropout of ``x`` with drop probability ``p`` (``F.dropout``'s contract; see the module).

    ``generator``: draw the mask from it instead of the device's default generator (sequence
    parallelism's per-rank stream, :mod:`lessons_pkg.tensor_parallel.random`); off the 15-bit path
    the mask is then ``bernoulli_(1 - p, generator=...)``, as ``F.dropout`` has no generator argument.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got p={p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not _quantization_fits(p):
        if generator is None:
            return F.dropout(x, p, True)
        if p == 1.0:
            return x * 0.0
        noise = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
        return x * noise
    keep = keep_mask(x.shape, p, x.device, generator)
    noise = keep.to(x.dtype).mul_(1.0 / (1.0 - quantized_drop_probability(p)))  # 0 or 1 / (1 - p'), like F.dropout's
    return x * noise  # autograd keeps noise for backward (grad_x = grad_y * noise), as F.dropout does
