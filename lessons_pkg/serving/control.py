"""How the serving rank tells the other ranks what to compute: one work item at a time, over gloo.

Only global rank 0 (TP rank 0 of the first pipeline stage) talks HTTP. Every
model rank must still run the same forward passes, so before each batch rank 0
broadcasts a :class:`WorkItem`; the other ranks wait for it in
:func:`lessons_pkg.serving.follower.follow`. The messages travel on a group of
their own, always gloo (CPU tensors), so the control path works the same when
the model's groups use NCCL on GPUs::

    rank 0                                 ranks 1..N-1
    ------                                 ------------
    send(WorkItem("generate", ...))  --->  receive()
    engine.generate(...)             <-->  engine.generate(...)      (the model's TP/PP collectives)
    agree(error or None)             <-->  agree(error or None)      (everyone's outcome, all ranks)

``agree`` ends every item: all ranks learn whether any rank failed, so rank 0
answers 500 for that request and the next item starts with every rank in step.
When idle, rank 0 sends a ``ping`` every ``heartbeat_s`` seconds: a dead rank
is noticed within one heartbeat (the collective fails), and the control group's
timeout bounds every wait, so nothing hangs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


@dataclass
class WorkItem:
    kind: str                                # "generate", "beam", "ping" or "stop"
    prompts: list[str] = field(default_factory=list)
    params: object = None                    # the engine's SamplingParams ("generate")
    beam: dict | None = None                 # beam_search keyword arguments ("beam")


class ControlChannel:
    """Rank 0 -> all ranks broadcast of work items, and an all-ranks agreement on the outcome.

    With one rank both are no-ops, so the same serving code runs on one process.
    """

    def __init__(self, timeout_s: float = 60.0):
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = None
        if self.world_size > 1:
            # every rank calls new_group with the same arguments (a collective)
            self.group = dist.new_group(list(range(self.world_size)), backend="gloo",
                                        timeout=timedelta(seconds=timeout_s))

    def send(self, item: WorkItem) -> None:
        """Rank 0: hand ``item`` to every other rank."""
        if self.group is not None:
            dist.broadcast_object_list([item], src=0, group=self.group)

    def receive(self) -> WorkItem:
        """Ranks 1..N-1: wait for rank 0's next item (at most the group's timeout)."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        """``obj`` of every rank, on every rank (e.g. the process ids /health shows)."""
        if self.group is None:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: str | None) -> list[str | None]:
        """Every rank's error for the item just run (``None`` = fine), on every rank."""
        if self.group is None:
            return [error]
        errors: list = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.group)
        return errors
