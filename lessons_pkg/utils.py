"""Small helpers every lesson uses: deterministic seeding and rank-0 printing."""
from __future__ import annotations

import random

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
