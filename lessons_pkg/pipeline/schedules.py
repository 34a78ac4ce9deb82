"""Pipeline schedules as pure functions: which forward and backward each rank runs, in which order.

A pipeline of ``p`` ranks trains a batch split into ``m`` microbatches. The
model is cut into ``p * v`` consecutive pieces, the *virtual stages*; rank ``r``
holds ``v`` of them, its *model chunks*, assigned round-robin as in Megatron-LM::

    virtual stage of (rank r, chunk c) = c * p + r        p=2, v=2:  rank 0 holds stages 0 and 2
                                                                      rank 1 holds stages 1 and 3

A schedule is, for every rank, the ordered list of its compute actions
``F`` (forward) and ``B`` (backward) of one microbatch on one chunk. The
point-to-point messages follow from the model: a forward on virtual stage
``s > 0`` first receives its input from stage ``s - 1``; a backward on stage
``s < p*v - 1`` first receives the gradient of its output from stage ``s + 1``.
:meth:`Schedule.with_communication` spells them out as ``RECV_*``/``SEND_*``
actions, and :func:`simulate` places every action on a clock (unit time per
forward and per backward of one chunk), which is how the tables below were
made and how the tests check step counts and dependencies. ``rounds.py``
groups a rank's actions into rounds of messages and compute, the way the
executor runs them.

GPipe, p=4, m=4 (``F3`` = forward of microbatch 3; ``.`` = idle)::

    rank 0 | F0 F1 F2 F3  .  .  .  .  .  . B0 B1 B2 B3
    rank 1 |  . F0 F1 F2 F3  .  .  .  . B0 B1 B2 B3  .
    rank 2 |  .  . F0 F1 F2 F3  .  . B0 B1 B2 B3  .  .
    rank 3 |  .  .  . F0 F1 F2 F3 B0 B1 B2 B3  .  .  .

1F1B (PipeDream-Flush), p=4, m=8: warm-up forwards, then one forward / one
backward in the steady state, then the cool-down backwards; at most ``p - r``
microbatches are in flight on rank ``r`` instead of all ``m``::

    rank 0 | F0 F1 F2 F3  .  .  . B0 F4 B1 F5 B2 F6 B3 F7 B4  . B5  . B6  . B7
    rank 1 |  . F0 F1 F2  .  . B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5  . B6  . B7  .
    rank 2 |  .  . F0 F1  . B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6  . B7  .  .
    rank 3 |  .  .  . F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7  .  .  .

Both take ``2 (m + p - 1)`` steps, of which ``2 m`` are busy on every rank:
the bubble is ``(p - 1) / (m + p - 1)`` of the time. Interleaved 1F1B (v
chunks, each 1/v of a stage's work) takes ``2 (v m + p - 1)`` chunk-steps for
``2 v m`` busy ones: the bubble relative to the ideal time shrinks from
``(p - 1) / m`` to ``(p - 1) / (v m)``. Print any schedule with
``print(format_table(simulate(schedule)))``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FORWARD, BACKWARD = "F", "B"
SEND_FORWARD, RECV_FORWARD = "SEND_F", "RECV_F"  # activations, stage s -> s + 1
SEND_BACKWARD, RECV_BACKWARD = "SEND_B", "RECV_B"  # gradients,  stage s + 1 -> s


@dataclass(frozen=True)
class Action:
    """One thing a rank does: compute (``F``/``B``) or a message (``SEND_*``/``RECV_*``).

    ``chunk`` is the local model-chunk index (0 .. v-1) on this rank; ``peer``
    is the pipeline rank a message goes to or comes from (None for compute);
    ``phase`` is 'warmup', 'steady' or 'cooldown' for 1F1B-style schedules.
    """

    op: str
    microbatch: int
    chunk: int = 0
    phase: str = ""
    peer: int | None = None

    def __str__(self) -> str:
        text = f"{self.op}{self.microbatch}"
        return text if self.chunk == 0 else f"{text}.{self.chunk}"


@dataclass
class Schedule:
    """The compute order of every rank of one pipeline; ``actions[r]`` is rank r's list."""

    name: str
    num_stages: int  # p, ranks in the pipeline
    num_microbatches: int  # m
    num_chunks: int  # v, model chunks per rank
    actions: list[list[Action]] = field(repr=False)
    # communicate once per steady-state forward + backward pair (Megatron's interleaved schedule; see rounds.py)
    pair_steady: bool = False

    def virtual_stage(self, rank: int, chunk: int) -> int:
        return chunk * self.num_stages + rank

    def location(self, virtual_stage: int) -> tuple[int, int]:
        """(rank, chunk) holding a virtual stage."""
        return virtual_stage % self.num_stages, virtual_stage // self.num_stages

    @property
    def num_virtual_stages(self) -> int:
        return self.num_stages * self.num_chunks

    def with_communication(self, rank: int) -> list[Action]:
        """Rank ``rank``'s actions with the messages each compute action needs and produces.

        A receive is placed just before the compute that consumes it, a send
        just after the compute that produces it.
        """
        p, last = self.num_stages, self.num_virtual_stages - 1
        out: list[Action] = []
        for a in self.actions[rank]:
            s = self.virtual_stage(rank, a.chunk)
            if a.op == FORWARD:
                if s > 0:
                    out.append(Action(RECV_FORWARD, a.microbatch, a.chunk, a.phase, peer=(rank - 1) % p))
                out.append(a)
                if s < last:
                    out.append(Action(SEND_FORWARD, a.microbatch, a.chunk, a.phase, peer=(rank + 1) % p))
            else:
                if s < last:
                    out.append(Action(RECV_BACKWARD, a.microbatch, a.chunk, a.phase, peer=(rank + 1) % p))
                out.append(a)
                if s > 0:
                    out.append(Action(SEND_BACKWARD, a.microbatch, a.chunk, a.phase, peer=(rank - 1) % p))
        return out


def _check_sizes(num_stages: int, num_microbatches: int, num_chunks: int = 1) -> None:
    for name, value in (("num_stages", num_stages), ("num_microbatches", num_microbatches), ("num_chunks", num_chunks)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all ``m`` forwards, then all ``m`` backwards (a pipeline flush).

    Simple, but each rank keeps the activations of all ``m`` microbatches
    until its first backward.
    """
    _check_sizes(num_stages, num_microbatches)
    m = num_microbatches
    per_rank = [Action(FORWARD, i) for i in range(m)] + [Action(BACKWARD, i) for i in range(m)]
    return Schedule("gpipe", num_stages, m, 1, [list(per_rank) for _ in range(num_stages)])


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B / PipeDream-Flush: warm-up forwards, then alternate one forward and one backward.

    Rank ``r`` runs ``min(p - r - 1, m)`` warm-up forwards, so at most
    ``p - r`` microbatches are in flight on it: the activation memory no
    longer grows with ``m``. Same bubble as GPipe; the flush at the end keeps a
    single version of the weights (unlike PipeDream and PipeDream-2BW).
    """
    _check_sizes(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    actions = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        seq = [Action(FORWARD, i, phase="warmup") for i in range(warmup)]
        for i in range(m - warmup):  # steady state: forward of a new microbatch, backward of the oldest
            seq += [Action(FORWARD, warmup + i, phase="steady"), Action(BACKWARD, i, phase="steady")]
        seq += [Action(BACKWARD, i, phase="cooldown") for i in range(m - warmup, m)]
        actions.append(seq)
    return Schedule("1f1b", p, m, 1, actions)


def interleaved_one_f_one_b(num_stages: int, num_microbatches: int, num_chunks: int) -> Schedule:
    """Interleaved 1F1B (Megatron-LM, Narayanan et al. 2021) with ``v = num_chunks`` chunks per rank.

    The forwards of rank r walk through groups of ``p`` microbatches, one chunk
    after another: with p=2, v=2 the k-th forward is (microbatch, chunk)
    (0,0) (1,0) (0,1) (1,1) (2,0) (3,0) (2,1) (3,1) ... Backwards walk the same
    way with the chunks reversed. Rank r first runs ``2 (p - r - 1) + (v - 1) p``
    warm-up forwards, then alternates, then cools down. Because microbatches
    go round in groups of ``p``, ``m`` must be a multiple of ``p``.

    p=2, m=4, v=2 on the unit-time clock (``F3.1`` = forward of microbatch 3 on chunk 1)::

        rank 0 |   F0   F1 F0.1 F1.1   F2 B0.1   F3 B1.1 F2.1   B0 F3.1   B1    . B2.1    . B3.1   B2   B3
        rank 1 |    .   F0   F1 F0.1 B0.1 F1.1 B1.1   F2   B0   F3   B1 F2.1 B2.1 F3.1 B3.1   B2   B3    .
    """
    _check_sizes(num_stages, num_microbatches, num_chunks)
    p, m, v = num_stages, num_microbatches, num_chunks
    if m % p != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of microbatches (m={m}) to be a multiple of "
            f"the number of pipeline stages (p={p})"
        )
    total = m * v

    def unit(k: int, forward: bool) -> tuple[int, int]:
        group, within = divmod(k, p * v)
        chunk = within // p
        microbatch = group * p + k % p
        return microbatch, chunk if forward else v - 1 - chunk

    actions = []
    for r in range(p):
        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
        seq = [Action(FORWARD, *unit(k, True), phase="warmup") for k in range(warmup)]
        for i in range(total - warmup):
            seq += [Action(FORWARD, *unit(warmup + i, True), phase="steady"),
                    Action(BACKWARD, *unit(i, False), phase="steady")]
        seq += [Action(BACKWARD, *unit(k, False), phase="cooldown") for k in range(total - warmup, total)]
        actions.append(seq)
    return Schedule("interleaved", p, m, v, actions, pair_steady=True)


def get_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> Schedule:
    """Build a schedule by name: 'gpipe', '1f1b' or 'interleaved'."""
    if name == "interleaved":
        return interleaved_one_f_one_b(num_stages, num_microbatches, num_chunks)
    if name in ("gpipe", "1f1b") and num_chunks != 1:
        raise ValueError(f"schedule '{name}' runs one model chunk per rank, got num_chunks={num_chunks}; "
                         "use 'interleaved' for several")
    if name == "gpipe":
        return gpipe(num_stages, num_microbatches)
    if name == "1f1b":
        return one_f_one_b(num_stages, num_microbatches)
    raise ValueError(f"unknown schedule {name!r}: expected 'gpipe', '1f1b' or 'interleaved'")


# --- a clock for schedules: unit-time forward and backward -----------------------------
def simulate(schedule: Schedule, forward_time: int = 1, backward_time: int = 1) -> list[list[Action | None]]:
    """Place every compute action on a clock; return ``grid[rank][t]`` (None where the rank idles).

    Each rank runs its actions in its order; an action starts as soon as its
    rank is free and its inputs exist (the forward of the previous virtual
    stage, the backward of the next one); messages take no time. Raises
    ``RuntimeError`` if the orders contradict the data dependencies (the
    executor would deadlock on such a schedule).
    """
    p, last = schedule.num_stages, schedule.num_virtual_stages - 1
    done: dict[tuple[str, int, int], int] = {}  # (op, microbatch, virtual stage) -> finish time
    nxt = [0] * p  # index of each rank's next action
    free = [0] * p  # time each rank becomes free
    grid: list[list[Action | None]] = [[] for _ in range(p)]
    remaining = sum(len(a) for a in schedule.actions)
    while remaining:
        progressed = False
        for r in range(p):
            if nxt[r] == len(schedule.actions[r]):
                continue
            a = schedule.actions[r][nxt[r]]
            s = schedule.virtual_stage(r, a.chunk)
            if a.op == FORWARD:
                deps = [(FORWARD, a.microbatch, s - 1)] if s > 0 else []
            else:
                deps = [(FORWARD, a.microbatch, s)] + ([(BACKWARD, a.microbatch, s + 1)] if s < last else [])
            if any(d not in done for d in deps):
                continue
            start = max([free[r]] + [done[d] for d in deps])
            duration = forward_time if a.op == FORWARD else backward_time
            grid[r] += [None] * (start - len(grid[r])) + [a] * duration
            free[r] = done[(a.op, a.microbatch, s)] = start + duration
            nxt[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            stuck = {r: str(schedule.actions[r][nxt[r]]) for r in range(p) if nxt[r] < len(schedule.actions[r])}
            raise RuntimeError(f"schedule '{schedule.name}' deadlocks: ranks wait forever at {stuck}")
    steps = max(len(row) for row in grid)
    return [row + [None] * (steps - len(row)) for row in grid]


def format_table(grid: list[list[Action | None]]) -> str:
    """The grid of :func:`simulate` as text, one row per rank (``F3.1`` = forward of microbatch 3 on chunk 1)."""
    width = max((len(str(a)) for row in grid for a in row if a is not None), default=1)
    lines = []
    for r, row in enumerate(grid):
        cells, prev = [], None
        for a in row:
            # an action lasting several steps is written once, then continued with '-'
            cell = "." if a is None else ("-" if a is prev else str(a))
            cells.append(cell.rjust(width))
            prev = a
        lines.append(f"rank {r} | " + " ".join(cells))
    return "\n".join(lines)


def in_flight(schedule: Schedule, rank: int) -> int:
    """Most microbatches whose forward has run on ``rank`` and whose backward has not (all chunks counted)."""
    alive = peak = 0
    for a in schedule.actions[rank]:
        alive += 1 if a.op == FORWARD else -1
        peak = max(peak, alive)
    return peak
