"""Small helpers every lesson uses: seeding, rank-0 printing, and comparisons that NaN cannot fool.

Every verification in the course compares through :func:`max_abs_error`,
:func:`largest`, :func:`within` or :func:`check_close`. A NaN compares false
with everything, so ``max(0.0, nan)`` is ``0.0`` and ``nan < bound`` is
``False`` only by luck of the order; these helpers turn any non-finite value
into ``inf``, which fails every bound and survives ``all_reduce(MAX)``.
"""
from __future__ import annotations

import math
import random
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every GPU) with ``seed``.

    Ranks that call it with the same seed draw the same numbers, which is how
    the lessons build identical full-size master weights on every rank.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print_rank_0(*args, **kwargs) -> None:
    """``print`` on global rank 0 only (on every rank when not distributed)."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` as a float; ``inf`` if the shapes differ or either holds a NaN or an inf."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return (a - b).abs().max().item() if a.numel() else 0.0


def largest(errors: Iterable[float]) -> float:
    """The largest of ``errors``; ``inf`` if any is not finite (Python's ``max`` may drop a NaN)."""
    worst = 0.0
    for error in errors:
        if not math.isfinite(error):
            return math.inf
        worst = max(worst, error)
    return worst


def within(error: float, bound: float) -> bool:
    """``error <= bound`` for a finite error; ``False`` for NaN or inf."""
    return math.isfinite(error) and error <= bound


def check_close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """``torch.allclose`` that is ``False`` when the shapes differ or any value is NaN or inf (even in both)."""
    if a.shape != b.shape:
        return False
    a, b = a.detach(), b.detach().to(a.device)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    return torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=atol)
