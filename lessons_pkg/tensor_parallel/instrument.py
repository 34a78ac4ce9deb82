"""Count the collectives a piece of code issues, by wrapping ``torch.distributed`` for a while.

    with count_collectives() as counts:
        y = layer(x)
    counts["all_reduce"]      # how many all-reduces the forward pass issued

Used by the demos to show, not assume, where tensor parallelism communicates.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch.distributed as dist

_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


@contextmanager
def count_collectives(group: dist.ProcessGroup | None = None):
    """Yield a ``Counter`` of collective calls (on ``group`` if given) made inside the block."""
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in _NAMES}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if group is None or kwargs.get("group") is group:
                counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
