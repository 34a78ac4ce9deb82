"""Chapter 5 (pipeline parallelism): the bubble, the 1F1B order, activations in flight."""
from __future__ import annotations

from lessons_pkg.labs import Exercise, Fail
from lessons_pkg.pipeline.schedules import BACKWARD, FORWARD, get_schedule, in_flight, one_f_one_b, simulate
from lessons_pkg.pipeline.timeline import events_from_grid, measured_bubble

TARGET = 0.10  # "under 10%": strictly below


def bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """Idle fraction of one step, measured on the simulated timeline (forward 1 unit, backward 2)."""
    return measured_bubble(events_from_grid(simulate(get_schedule(name, p, m, v), 1, 2)))[0]


def _fewest(module, attr: str, name: str, p: int, v: int) -> str:
    m = getattr(module, attr, None)
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise Fail(f"{attr} must be a positive int, got {m!r}")
    try:
        b = bubble(name, p, m, v)
    except ValueError as e:
        raise Fail(f"{attr} = {m}: the {name} schedule refuses it: {e}") from None
    if not b < TARGET:
        raise Fail(f"{attr} = {m}: the measured bubble of {name} (p={p}, v={v}) is {b:.2%}, not under {TARGET:.0%}")
    for fewer in range(1, m):
        try:
            bf = bubble(name, p, fewer, v)
        except ValueError:
            continue  # a count the schedule does not allow
        if bf < TARGET:
            raise Fail(f"{attr} = {m} works ({b:.2%}), but {fewer} micro-batches already give {bf:.2%}: not the fewest")
    return f"{attr} = {m}: bubble {b:.2%} < {TARGET:.0%}, and every smaller allowed m gives >= {TARGET:.0%}"


def check_bubble(module) -> list[str]:
    return [_fewest(module, "FEWEST_MICROBATCHES_1F1B", "1f1b", 4, 1),
            _fewest(module, "FEWEST_MICROBATCHES_INTERLEAVED", "interleaved", 4, 2)]


def _names(actions) -> list[str]:
    return [f"{a.op}{a.microbatch}" for a in actions]


def check_order(module) -> list[str]:
    checked = 0
    for p in range(1, 6):
        for m in range(1, 9):
            expected = one_f_one_b(p, m)
            for rank in range(p):
                got = list(module.one_f_one_b_order(p, m, rank))
                want = _names(expected.actions[rank])
                if got != want:
                    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                    raise Fail(f"p={p}, m={m}, rank {rank}: yours {' '.join(got)}\n"
                               f"{' ' * len(f'p={p}, m={m}, rank {rank}: ')}1F1B  {' '.join(want)}\n"
                               f"first difference at position {first}")
                checked += 1
    return [f"the order of every rank matches 1F1B for p = 1..5, m = 1..8 ({checked} rank orders)"]


def check_in_flight(module) -> list[str]:
    checked = 0
    for name in ("gpipe", "1f1b"):
        for p in range(1, 6):
            for m in range(1, 13):
                schedule = get_schedule(name, p, m)
                for rank in range(p):
                    got = module.peak_in_flight(name, p, m, rank)
                    want = in_flight(schedule, rank)
                    if got != want:
                        raise Fail(f"{name}, p={p}, m={m}, rank {rank}: you say {got} micro-batches in flight at "
                                   f"most; running the schedule's forwards (+1) and backwards (-1) gives {want}")
                    checked += 1
    return [f"peak micro-batches in flight match GPipe and 1F1B on {checked} (schedule, p, m, rank) cases",
            "so GPipe's activation memory grows with m; 1F1B's stays at p - rank micro-batches"]


EXERCISES = [
    Exercise("ch5.1", "the fewest micro-batches for a bubble under 10% at p = 4", "ch5/bubble.py",
             "explore: python src/ch5/pipeline_timeline.py --num-microbatches M [--cost-ms 0]   (4 ranks)",
             check_bubble),
    Exercise("ch5.2", "write the 1F1B order of one rank (warm-up, steady state, cool-down)", "ch5/one_f_one_b.py",
             "compare with: python src/ch5/schedules_verify.py   (prints every rank's order)", check_order),
    Exercise("ch5.3", "activations in flight: GPipe against 1F1B", "ch5/in_flight.py",
             "measure: python src/ch5/pipeline_memory.py --microbatches 2 4 8", check_in_flight),
]
