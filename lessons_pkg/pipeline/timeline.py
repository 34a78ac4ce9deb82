"""Seeing a schedule run: timestamps of every forward and backward, the bubble, a drawing.

    recorder = Recorder(group)          # a barrier, then t = 0 on every rank
    forward_backward(..., recorder=recorder)
    events = recorder.gather()          # every rank's events, on every rank
    bubble = measured_bubble(events)
    draw(events, ax)

An event is ``(op, microbatch, chunk, start, end)`` in seconds since the
barrier. The bubble is the time a rank is not computing: with ``T`` the time
from the first start to the last end over all ranks and ``busy`` a rank's
summed compute time, averaged over ranks,

    bubble fraction of the step   = (T - busy) / T       theory (p-1) / (v m + p - 1)
    bubble relative to the ideal  = (T - busy) / busy    theory (p-1) / (v m)

(v = 1 for GPipe and 1F1B, whose fraction is the familiar (p-1) / (m+p-1)).
The theory assumes equal stages and free communication.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch.distributed as dist


class Event(NamedTuple):
    op: str  # 'F' or 'B'
    microbatch: int
    chunk: int
    start: float  # seconds since the common start
    end: float


class Recorder:
    """Collects this rank's events; ``gather`` brings all ranks' events together."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.events: list[Event] = []
        if dist.is_initialized():
            dist.barrier(group=group)  # all ranks leave the barrier within ~0.1 ms: a shared t = 0
        self.t0 = time.perf_counter()

    def record(self, op: str, microbatch: int, chunk: int, start: float, end: float) -> None:
        """Note that ``op`` of (microbatch, chunk) ran from ``start`` to ``end`` (``time.perf_counter`` values)."""
        self.events.append(Event(op, microbatch, chunk, start - self.t0, end - self.t0))

    def gather(self) -> list[list[Event]]:
        """``events[r]``: the events of pipeline rank r (a collective: every rank of the group calls it)."""
        if not dist.is_initialized():
            return [list(self.events)]
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, self.events, group=self.group)
        return [[Event(*e) for e in rank_events] for rank_events in everyone]


def events_from_grid(grid, step_time: float = 1.0) -> list[list[Event]]:
    """The events of a ``schedules.simulate`` grid (one clock step = ``step_time``): the theory beside a measurement."""
    events = []
    for row in grid:
        mine = []
        for t, a in enumerate(row):
            if a is None:
                continue
            if t > 0 and row[t - 1] is a:  # an action lasting several steps: extend its event
                mine[-1] = mine[-1]._replace(end=(t + 1) * step_time)
            else:
                mine.append(Event(a.op, a.microbatch, a.chunk, t * step_time, (t + 1) * step_time))
        events.append(mine)
    return events


def measured_bubble(events: list[list[Event]]) -> tuple[float, float]:
    """(bubble fraction of the step, bubble relative to the ideal time), averaged over ranks."""
    start = min(e.start for rank in events for e in rank)
    total = max(e.end for rank in events for e in rank) - start
    busy = sum(e.end - e.start for rank in events for e in rank) / len(events)
    return (total - busy) / total, (total - busy) / busy


def theoretical_bubble(num_stages: int, num_microbatches: int, num_chunks: int = 1) -> tuple[float, float]:
    """(fraction of the step, relative to ideal) for equal stages: (p-1)/(vm+p-1) and (p-1)/(vm)."""
    p, vm = num_stages, num_microbatches * num_chunks
    return (p - 1) / (vm + p - 1), (p - 1) / vm


def draw(events: list[list[Event]], ax, title: str = "", unit: str = "s") -> None:
    """One row per rank (rank 0 on top): forwards blue, backwards green, later chunks darker; labels = microbatch."""
    colors = {"F": ["#9ecae1", "#4292c6", "#08519c", "#08306b"], "B": ["#a1d99b", "#41ab5d", "#006d2c", "#00441b"]}
    start = min(e.start for rank in events for e in rank)
    longest = max(e.end for rank in events for e in rank) - start
    for r, rank_events in enumerate(events):
        y = len(events) - 1 - r
        for e in rank_events:
            color = colors[e.op][min(e.chunk, 3)]
            ax.broken_barh([(e.start - start, e.end - e.start)], (y - 0.4, 0.8), facecolors=color, edgecolors="white", linewidth=0.5)
            if (e.end - e.start) > 0.012 * longest:
                ax.text((e.start + e.end) / 2 - start, y, str(e.microbatch), ha="center", va="center",
                        fontsize=7, color="white" if e.chunk or e.op == "B" else "black")
    ax.set_yticks(range(len(events)), [f"rank {r}" for r in reversed(range(len(events)))])
    # axes that share x (plt.subplots(sharex=True)) share one limit: the longest timeline drawn on any of them
    ax._timeline_right = longest * 1.01
    right = max(getattr(a, "_timeline_right", 0.0) for a in ax.get_shared_x_axes().get_siblings(ax))
    ax.set_xlim(0, right)
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=10)
