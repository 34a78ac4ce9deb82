"""A layer that takes a fixed time: a stand-in for device compute when drawing timelines on CPU.

On a GPU cluster every stage has its own device, so p stages compute at the
same time. A laptop running p CPU ranks on two cores cannot show that: the
ranks fight for the cores and the picture measures the scheduler of the
operating system, not the pipeline. ``FixedCost`` sleeps instead of
computing: a sleeping rank uses no core, so p ranks "compute" in parallel on
any machine, and the measured timeline shows the schedule itself. Backward
takes twice the forward time by default, as it does for matrix products
(two products per product of the forward).

The timings it produces are real measurements of the executor (its
messages, its Python overhead, the gloo transport) around emulated compute;
they say nothing about the speed of any real layer.
"""
from __future__ import annotations

import time

import torch
from torch import nn


class _Sleep(torch.autograd.Function):
    """Identity in value; sleeps ``forward_s`` in forward and ``backward_s`` in backward."""

    @staticmethod
    def forward(ctx, x, forward_s: float, backward_s: float):
        time.sleep(forward_s)
        ctx.backward_s = backward_s  # a float, not a tensor: nothing saved for backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, None, None


class FixedCost(nn.Module):
    """``x -> x`` that costs ``forward_ms`` in forward and ``backward_ms`` (default 2x) in backward."""

    def __init__(self, forward_ms: float, backward_ms: float | None = None):
        super().__init__()
        self.forward_s = forward_ms / 1000
        self.backward_s = (2 * forward_ms if backward_ms is None else backward_ms) / 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.forward_s, self.backward_s)

    def extra_repr(self) -> str:
        return f"forward_ms={self.forward_s * 1000:g}, backward_ms={self.backward_s * 1000:g}"
