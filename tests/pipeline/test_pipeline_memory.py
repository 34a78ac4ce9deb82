"""Activation memory, measured with saved-tensor hooks: GPipe grows with m, 1F1B stays at p - r microbatches."""
import torch
import torch.distributed as dist

from lessons_pkg.pipeline import forward_backward
from lessons_pkg.pipeline.memory import Double, SavedTensorMeter, Square
from lessons_pkg.pipeline.partition import chunks_for_rank, toy_layers
from lessons_pkg.testing import run_on_ranks


def test_what_is_saved_for_backward_is_what_costs_memory():
    x = torch.randn(16, 8, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = Square.apply(x)
        assert meter.live == x.nbytes  # Square keeps its input in ctx
        z = Double.apply(x)
        assert meter.live == x.nbytes  # Double keeps nothing
        (y.sum() + z.sum()).backward()
        assert meter.live == 0  # the backward released what the forward saved
    assert meter.peak == x.nbytes
    # 2 x * 1 + 2 * 1: the same float32 operations as the reference below, so equal to the last bit
    assert torch.equal(x.grad, 2 * x.detach() + 2)


def test_meter_counts_each_storage_once_and_skips_parameters():
    layers = toy_layers(2, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(exclude=layers.parameters()) as meter:
        y = layers[1](layers[0](x))
        # linear saves its input, tanh its output; layer 1's input is layer 0's output: x, y0, y1
        assert meter.live == 3 * x.nbytes
        y.sum().backward()
    assert meter.live == 0 and meter.peak == 3 * x.nbytes


def test_meter_counts_a_view_by_its_storage():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = Square.apply(x[:, :2])  # a view of x: the whole storage of x stays alive
        assert meter.live == x.nbytes
        del y
    assert meter.live == 0


def _peaks(p, ms):
    group = dist.new_group(list(range(p)))
    rank = dist.get_rank(group)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        for m in ms:
            layers = toy_layers(2 * p, 16, seed=0)
            chunks = chunks_for_rank(layers, rank, p)
            xs = [torch.randn(4, 8, 16) for _ in range(m)]
            ts = [torch.randn(4, 8, 16) for _ in range(m)]
            with SavedTensorMeter(exclude=layers.parameters()) as meter:
                forward_backward(chunks, schedule, xs, ts, torch.nn.functional.mse_loss, group=group)
            assert meter.live == 0
            peaks[(schedule, m)] = meter.peak
    return peaks


def test_gpipe_grows_with_m_1f1b_stays_bounded():
    p, ms = 4, (1, 2, 4, 8, 16)
    per_rank = run_on_ranks(_peaks, p, args=(p, ms), timeout=60)
    for rank, peaks in enumerate(per_rank):
        one = peaks[("gpipe", 1)]  # activations of one microbatch on this stage
        assert one > 0
        for m in ms:
            # GPipe keeps all m microbatches until the first backward
            assert peaks[("gpipe", m)] == m * one, (rank, m, peaks)
            # 1F1B keeps at most p - rank of them, whatever m
            assert peaks[("1f1b", m)] == min(m, p - rank) * one, (rank, m, peaks)
