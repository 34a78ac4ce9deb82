"""Activation memory: the tensors autograd keeps from the forward for the backward.

To compute a gradient, most operations need something from their forward:
``y = x * x`` needs ``x`` (dy/dx = 2x), ``y = tanh(x)`` needs ``y``
(1 - y^2), ``y = x W^T`` needs ``x`` for dW and ``W`` for dx. A custom
``torch.autograd.Function`` makes the choice explicit: what goes into
``ctx.save_for_backward`` stays in memory until the backward has run.

    class Square(torch.autograd.Function):      # saves its input: costs x.nbytes until backward
    class Double(torch.autograd.Function):      # gradient is the constant 2: saves nothing

:class:`SavedTensorMeter` counts those bytes with
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
passes through the pack hook; we count the bytes of its storage (once per
storage, however many times it is saved) until autograd drops it after the
backward. Parameters are saved too (``x W^T`` saves ``W``) but are not
activations: storages of the tensors given as ``exclude`` are not counted.

Saved-tensor hooks are thread-local: a forward that runs in another thread
(torchgpipe computes its partitions in worker threads) is invisible to a
meter entered in the main thread. Enter ``meter.in_this_thread()`` inside
that thread too; the counts are shared and guarded by a lock.
"""
from __future__ import annotations

import threading
from typing import Iterable

import torch


class Square(torch.autograd.Function):
    """``y = x^2``; backward ``2 x dy`` needs ``x``, so forward saves it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return 2 * x * grad_y


class Double(torch.autograd.Function):
    """``y = 2 x``; backward ``2 dy`` needs nothing from the forward, so nothing is saved."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad_y):
        return 2 * grad_y


class _Saved:
    """What autograd keeps instead of the tensor; dropping it releases the count."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        if self.key is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager: ``live`` and ``peak`` bytes of activations saved for backward while it is active.

        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(x).sum()       # meter.live grows
            loss.backward()             # meter.live back to 0
        meter.peak
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = self.peak = 0
        self._refs: dict[tuple, list[int]] = {}  # storage -> [bytes, times saved and not yet released]
        self._lock = threading.Lock()  # packs may come from several threads, releases from the garbage collector
        self._hooks = self.in_this_thread()

    def in_this_thread(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context manager that makes this meter count what autograd saves in the calling thread as well."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self.excluded or storage.nbytes() == 0:
            return _Saved(tensor, self, None)
        key = (tensor.device, storage.data_ptr())
        with self._lock:
            entry = self._refs.setdefault(key, [storage.nbytes(), 0])
            if entry[1] == 0:
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        with self._lock:
            entry = self._refs[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._refs[key]

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
