"""Schedules as pure functions: orders, completeness, dependencies, step counts, in-flight microbatches."""
import itertools

import pytest

from lessons_pkg.pipeline.schedules import (
    BACKWARD, FORWARD, RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action,
    format_table, get_schedule, gpipe, in_flight, interleaved_one_f_one_b, one_f_one_b, simulate,
)

SIZES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 8, 16)]


def all_schedules():
    for p, m in SIZES:
        yield gpipe(p, m)
        yield one_f_one_b(p, m)
        for v in (1, 2, 3):
            if m % p == 0:
                yield interleaved_one_f_one_b(p, m, v)


def test_gpipe_order():
    s = gpipe(3, 4)
    expected = [f"F{i}" for i in range(4)] + [f"B{i}" for i in range(4)]
    assert all([str(a) for a in row] == expected for row in s.actions)


def test_1f1b_order_and_phases():
    s = one_f_one_b(4, 6)
    # rank 1: p - r - 1 = 2 warm-up forwards, 4 steady pairs, 2 cool-down backwards
    assert [str(a) for a in s.actions[1]] == "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 B4 B5".split()
    assert [a.phase for a in s.actions[1]] == ["warmup"] * 2 + ["steady"] * 8 + ["cooldown"] * 2
    # the last rank never warms up: F0 B0 F1 B1 ...
    assert [str(a) for a in s.actions[3]] == [f"{op}{i}" for i in range(6) for op in "FB"]


def test_interleaved_order_matches_megatron():
    s = interleaved_one_f_one_b(2, 4, 2)
    # forwards walk groups of p=2 microbatches chunk by chunk; 2 (p-r-1) + (v-1) p = 4 warm-up forwards on rank 0
    forwards = [(a.microbatch, a.chunk) for a in s.actions[0] if a.op == FORWARD]
    assert forwards == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]
    backwards = [(a.microbatch, a.chunk) for a in s.actions[0] if a.op == BACKWARD]
    assert backwards == [(0, 1), (1, 1), (0, 0), (1, 0), (2, 1), (3, 1), (2, 0), (3, 0)]
    assert [a.phase for a in s.actions[0]][:5] == ["warmup"] * 4 + ["steady"]


@pytest.mark.parametrize("schedule", list(all_schedules()), ids=lambda s: f"{s.name}-p{s.num_stages}-m{s.num_microbatches}-v{s.num_chunks}")
def test_every_microbatch_forward_then_backward_once_per_chunk(schedule):
    for rank, actions in enumerate(schedule.actions):
        seen = [(a.op, a.microbatch, a.chunk) for a in actions]
        units = set(itertools.product(range(schedule.num_microbatches), range(schedule.num_chunks)))
        assert sorted(seen) == sorted([(op, i, c) for op in (FORWARD, BACKWARD) for i, c in units])
        for i, c in units:
            assert seen.index((FORWARD, i, c)) < seen.index((BACKWARD, i, c))


@pytest.mark.parametrize("schedule", list(all_schedules()), ids=lambda s: f"{s.name}-p{s.num_stages}-m{s.num_microbatches}-v{s.num_chunks}")
def test_dependencies_and_step_count(schedule):
    p, m, v = schedule.num_stages, schedule.num_microbatches, schedule.num_chunks
    grid = simulate(schedule)  # raises if the orders contradict the dependencies
    start = {}
    for r, row in enumerate(grid):
        for t, a in enumerate(row):
            if a is not None:
                start[(a.op, a.microbatch, schedule.virtual_stage(r, a.chunk))] = t
    last = p * v - 1
    for (op, i, s), t in start.items():
        if op == FORWARD and s > 0:
            assert t > start[(FORWARD, i, s - 1)]  # forward of stage s after stage s-1's
        if op == BACKWARD:
            assert t > start[(FORWARD, i, s)]
            if s < last:
                assert t > start[(BACKWARD, i, s + 1)]  # backwards run in reverse stage order
    # unit-time forward and backward of one chunk: 2 (v m + p - 1) steps, 2 v m of them busy on each rank
    assert len(grid[0]) == 2 * (v * m + p - 1)
    assert all(sum(a is not None for a in row) == 2 * v * m for row in grid)


@pytest.mark.parametrize("p,m", [(4, 8), (3, 5), (4, 1)])
def test_1f1b_takes_2_m_plus_p_minus_1_steps_also_with_slower_backward(p, m):
    assert len(simulate(one_f_one_b(p, m))[0]) == 2 * (m + p - 1)
    # backward twice as slow as forward (as on GPUs): (m + p - 1) (t_f + t_b)
    assert len(simulate(one_f_one_b(p, m), 1, 2)[0]) == (m + p - 1) * 3


@pytest.mark.parametrize("p,m", SIZES)
def test_in_flight_microbatches(p, m):
    # GPipe holds every microbatch before its first backward; 1F1B at most p - r on rank r
    assert [in_flight(gpipe(p, m), r) for r in range(p)] == [m] * p
    assert [in_flight(one_f_one_b(p, m), r) for r in range(p)] == [min(p - r, m) for r in range(p)]


def test_communication_pairs_up():
    """Every SEND has a matching RECV on the peer, and per direction the messages form the same set."""
    for s in all_schedules():
        sends, recvs = set(), set()
        for r in range(s.num_stages):
            for a in s.with_communication(r):
                stage = s.virtual_stage(r, a.chunk)
                if a.op == SEND_FORWARD:
                    sends.add(("act", a.microbatch, stage, stage + 1))
                elif a.op == RECV_FORWARD:
                    recvs.add(("act", a.microbatch, stage - 1, stage))
                elif a.op == SEND_BACKWARD:
                    sends.add(("grad", a.microbatch, stage, stage - 1))
                elif a.op == RECV_BACKWARD:
                    recvs.add(("grad", a.microbatch, stage + 1, stage))
        assert sends == recvs
        assert len(sends) == 2 * s.num_microbatches * (s.num_virtual_stages - 1)


def test_with_communication_places_messages_around_compute():
    s = one_f_one_b(2, 2)
    assert [(a.op, a.microbatch, a.peer) for a in s.with_communication(0)] == [
        (FORWARD, 0, None), (SEND_FORWARD, 0, 1),
        (FORWARD, 1, None), (SEND_FORWARD, 1, 1), (RECV_BACKWARD, 0, 1), (BACKWARD, 0, None),
        (RECV_BACKWARD, 1, 1), (BACKWARD, 1, None),
    ]


def test_format_table():
    # GPipe p=2 m=2: rank 1 can start B0 right after its F1; rank 0 waits for rank 1's B0
    assert format_table(simulate(gpipe(2, 2))) == "rank 0 | F0 F1  .  . B0 B1\nrank 1 |  . F0 F1 B0 B1  ."


def test_simulate_detects_a_deadlocking_order():
    s = one_f_one_b(2, 2)
    s.actions[1] = [Action(BACKWARD, 0), Action(FORWARD, 0), Action(FORWARD, 1), Action(BACKWARD, 1)]
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(s)


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"m=6\) to be a multiple of .*p=4\)"):
        interleaved_one_f_one_b(4, 6, 2)
    with pytest.raises(ValueError, match="num_microbatches must be a positive integer, got 0"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="num_chunks=2"):
        get_schedule("1f1b", 2, 4, 2)
    with pytest.raises(ValueError, match="unknown schedule 'zb'"):
        get_schedule("zb", 2, 4)


def test_messages_are_received_in_the_order_they_are_sent():
    """Per directed pair of ranks, the receiver consumes messages in the sender's order.

    So p2p needs no tags to match messages: correct also on backends that ignore
    tags (NCCL); the executor still checks a message id carried in each header.
    """
    for s in all_schedules():
        sent, received = {}, {}
        for r in range(s.num_stages):
            for a in s.with_communication(r):
                stage = s.virtual_stage(r, a.chunk)
                if a.op == SEND_FORWARD:
                    sent.setdefault((r, a.peer), []).append(("act", a.microbatch, stage))
                elif a.op == SEND_BACKWARD:
                    sent.setdefault((r, a.peer), []).append(("grad", a.microbatch, stage))
                elif a.op == RECV_FORWARD:
                    received.setdefault((a.peer, r), []).append(("act", a.microbatch, stage - 1))
                elif a.op == RECV_BACKWARD:
                    received.setdefault((a.peer, r), []).append(("grad", a.microbatch, stage + 1))
        assert sent == received, (s.name, s.num_stages, s.num_microbatches, s.num_chunks)


@pytest.mark.parametrize("schedule,doc", [
    (gpipe(4, 4), "module"), (one_f_one_b(4, 8), "module"), (interleaved_one_f_one_b(2, 4, 2), "function"),
])
def test_docstring_tables_are_what_simulate_prints(schedule, doc):
    import lessons_pkg.pipeline.schedules as module

    text = module.__doc__ if doc == "module" else module.interleaved_one_f_one_b.__doc__
    for line in format_table(simulate(schedule)).splitlines():
        assert line in text
