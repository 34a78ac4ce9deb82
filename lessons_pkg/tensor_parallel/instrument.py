"""Count the collectives a piece of code issues, and the bytes they carry, by wrapping ``torch.distributed``.

    with count_collectives() as counts:
        y = layer(x)
    counts["all_reduce"]          # how many all-reduces the forward pass issued
    counts.bytes["all_reduce"]    # the bytes of the tensors they reduced
    counts.ring_bytes_sent(4)     # what each of 4 ranks sends for them with the ring algorithms

Used by the demos to show, not assume, where tensor parallelism communicates.
torch 2.13 renamed ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` to
``all_gather_single`` and ``reduce_scatter_single``: either name is counted
under the older one, which every torch version has.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")
_RENAMED = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


class CollectiveCounts(Counter):
    """Calls per collective; ``bytes``: per collective, the bytes of the whole tensor it produced or consumed
    (the all-reduced tensor, the all-gathered output, the reduce-scattered input)."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()

    def ring_bytes_sent(self, world: int) -> int:
        """Bytes each of ``world`` ranks sends for these collectives with ring algorithms: an all-gather or a
        reduce-scatter of N bytes sends (world - 1) / world x N, an all-reduce (one of each) twice that."""
        share = (world - 1) / world
        return round(sum(n * share * (2 if name == "all_reduce" else 1) for name, n in self.bytes.items()
                         if name != "broadcast"))


def _payload(name: str, args, kwargs) -> int:
    """Bytes of the whole tensor of one call (see :class:`CollectiveCounts`)."""
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        tensor = args[1] if len(args) > 1 else kwargs.get("input")
    else:
        tensor = args[0] if args else next(iter(kwargs.values()), None)
    if isinstance(tensor, (list, tuple)):  # all_gather's list of outputs
        return sum(t.numel() * t.element_size() for t in tensor)
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


@contextmanager
def count_collectives(group: dist.ProcessGroup | None = None):
    """Yield a :class:`CollectiveCounts` of collective calls (on ``group`` if given) made inside the block."""
    counts = CollectiveCounts()
    originals = {name: getattr(dist, name) for name in (*_NAMES, *_RENAMED) if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if group is None or kwargs.get("group") is group:
                counts[_RENAMED.get(name, name)] += 1
                counts.bytes[_RENAMED.get(name, name)] += _payload(name, args, kwargs)
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
