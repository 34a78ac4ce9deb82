"""Timeline recording and bubble arithmetic (no timing claims: structure only)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lessons_pkg.pipeline import forward_backward, get_schedule  # noqa: E402
from lessons_pkg.pipeline.costs import FixedCost  # noqa: E402
from lessons_pkg.pipeline.partition import chunks_for_rank, toy_layers  # noqa: E402
from lessons_pkg.pipeline.schedules import simulate  # noqa: E402
from lessons_pkg.testing import run_on_ranks  # noqa: E402
from lessons_pkg.pipeline.timeline import Recorder, draw, events_from_grid, measured_bubble, theoretical_bubble  # noqa: E402


@pytest.mark.parametrize("name,p,m,v", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 3, 5, 1),
                                        ("interleaved", 4, 8, 2), ("interleaved", 2, 6, 3)])
def test_bubble_of_the_unit_time_schedule_is_the_theory(name, p, m, v):
    events = events_from_grid(simulate(get_schedule(name, p, m, v)))
    fraction, relative = measured_bubble(events)
    expected_fraction, expected_relative = theoretical_bubble(p, m, v)
    assert fraction == pytest.approx(expected_fraction, rel=1e-12)  # exact up to float rounding
    assert relative == pytest.approx(expected_relative, rel=1e-12)


def test_draw_one_box_per_event():
    events = events_from_grid(simulate(get_schedule("interleaved", 2, 4, 2)))
    fig, ax = plt.subplots()
    draw(events, ax, "interleaved")
    assert len(ax.collections) == sum(len(e) for e in events)
    plt.close(fig)


def test_every_bar_lies_inside_its_axis_when_axes_share_x():
    """Chapter 5's figure: 1F1B (22 steps) above interleaving (19 half-steps) on plt.subplots(sharex=True).
    The shared limit must hold the longer timeline, whichever is drawn last."""
    from lessons_pkg.pipeline.schedules import interleaved_one_f_one_b, one_f_one_b

    for order in ((0, 1), (1, 0)):
        fig, axes = plt.subplots(2, 1, sharex=True)
        drawn = [(one_f_one_b(4, 8), 1.0), (interleaved_one_f_one_b(4, 8, 2), 0.5)]
        for i in order:
            schedule, step = drawn[i]
            draw(events_from_grid(simulate(schedule), step), axes[i])
        for ax in axes:
            right = ax.get_xlim()[1]
            for bars in ax.collections:
                for path in bars.get_paths():
                    assert path.vertices[:, 0].max() <= right + 1e-9, (order, path.vertices[:, 0].max(), right)
        plt.close(fig)


def test_fixed_cost_is_identity_with_gradient():
    x = torch.randn(3, requires_grad=True)
    FixedCost(0.0)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def _record(name, p, m, v):
    group = dist.new_group(list(range(p)))
    rank = dist.get_rank(group)
    layers = toy_layers(p * v, 8)
    chunks = [torch.nn.Sequential(c, FixedCost(1.0)) for c in chunks_for_rank(layers, rank, p, v)]
    xs = [torch.randn(2, 8) for _ in range(m)]
    recorder = Recorder(group)
    forward_backward(chunks, name, xs, xs, torch.nn.functional.mse_loss, group=group, recorder=recorder)
    return recorder.gather()


def test_recorded_events_follow_the_schedule():
    name, p, m, v = "interleaved", 2, 4, 2
    events = run_on_ranks_once(name, p, m, v)
    schedule = get_schedule(name, p, m, v)
    for rank, rank_events in enumerate(events):
        assert [(e.op, e.microbatch, e.chunk) for e in rank_events] == [
            (a.op, a.microbatch, a.chunk) for a in schedule.actions[rank]]
        for e, nxt in zip(rank_events, rank_events[1:]):
            assert 0 <= e.start < e.end <= nxt.start  # one rank computes one thing at a time
            assert e.end - e.start >= 0.001 * (1 if e.op == "F" else 2)  # FixedCost's sleep is inside


def run_on_ranks_once(name, p, m, v):
    results = run_on_ranks(_record, p, args=(name, p, m, v), timeout=60)
    assert all(r == results[0] for r in results)  # every rank gathered the same events
    return results[0]
