"""What every rank but the serving one does: wait for a work item, run it with the others, repeat.

While rank 0 waits for HTTP requests, ranks 1..N-1 sit in ``channel.receive()``
(a gloo broadcast). Each item is run collectively, exactly as rank 0 runs it
(the same engine call with the same arguments), then all ranks ``agree`` on
the outcome; a ``stop`` item ends the loop.
"""
from __future__ import annotations

from lessons_pkg.serving.control import ControlChannel, WorkItem


def run_item(engine, item: WorkItem, callback=None) -> dict:
    """The engine call an item stands for; the same on every rank (``callback`` only on rank 0)."""
    if item.kind == "generate":
        return engine.generate(item.prompts, item.params, callback=callback)
    if item.kind == "beam":
        return engine.beam_search(item.prompts, **item.beam)
    raise ValueError(f"unknown work item kind {item.kind!r}")


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def follow(engine, channel: ControlChannel) -> int:
    """Serve rank 0's work items until ``stop``; returns the number of items run."""
    done = 0
    while True:
        item = channel.receive()
        if item.kind == "stop":
            return done
        error = None
        if item.kind != "ping":
            try:
                run_item(engine, item)
            except Exception as e:  # reported to rank 0 through agree(); this rank stays in the loop
                error = describe(e)
            done += 1
        channel.agree(error)
