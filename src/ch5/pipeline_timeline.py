"""Measure and draw the timeline of GPipe, 1F1B and interleaved 1F1B; compare the bubble with theory.

    python src/ch5/pipeline_timeline.py [--nproc 4] [--num-microbatches 8] [--cost-ms 4]    # or under torchrun

Each layer is Linear + tanh followed by a ``FixedCost`` of ``--cost-ms`` in
forward and twice that in backward (a stand-in for GPU time, see
``lessons_pkg/pipeline/costs.py``: sleeping ranks do not compete for the CPU
cores, so p ranks behave like p devices). ``--cost-ms 0`` times the real CPU
compute alone. Every rank timestamps each forward and backward (from a
shared, barrier-synchronised start); rank 0 gathers them, draws the measured
timeline beside the unit-time schedule, and prints the measured bubble next
to the theory. The run is also checked against the single-process model:
the script exits with status 1 if gradients differ.

Writes ``outputs/ch5/pipeline_timeline.png``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lessons_pkg.launch import add_nproc_argument, start_ranks  # noqa: E402
from lessons_pkg import parallel_state  # noqa: E402
from lessons_pkg.pipeline import forward_backward, get_schedule, serial_forward_backward  # noqa: E402
from lessons_pkg.pipeline.costs import FixedCost  # noqa: E402
from lessons_pkg.pipeline.partition import LinearTanh, chunk_layer_ranges, chunks_for_rank  # noqa: E402
from lessons_pkg.pipeline.schedules import simulate  # noqa: E402
from lessons_pkg.pipeline.timeline import Recorder, draw, events_from_grid, measured_bubble, theoretical_bubble  # noqa: E402
from lessons_pkg.utils import largest, max_abs_error, print_rank_0, within  # noqa: E402

TOLERANCE = 1e-5  # float32, summation order of microbatch gradients only


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--cost-ms", type=float, default=10.0, help="emulated forward time per layer (backward: 2x); 0: none")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per schedule; the fastest is drawn")
    parser.add_argument("--out", default="outputs/ch5/pipeline_timeline.png")
    add_nproc_argument(parser, default=4)
    return parser.parse_args()


def build_layers(args) -> nn.ModuleList:
    torch.manual_seed(0)
    layers = []
    for _ in range(args.num_layers):
        layer = LinearTanh(args.hidden_size)
        layers.append(nn.Sequential(layer, FixedCost(args.cost_ms)) if args.cost_ms > 0 else layer)
    return nn.ModuleList(layers)


def run(name: str, v: int, args, group):
    """One timed forward/backward of schedule ``name`` (the fastest of ``--repeats``); return (events, max error)."""
    p, stage = dist.get_world_size(group), dist.get_rank(group)
    layers = build_layers(args)
    reference = copy.deepcopy(layers)
    chunks = chunks_for_rank(layers, stage, p, v)
    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length, args.hidden_size)  # [batch, seq, hidden]
    xs = [torch.randn(shape, generator=g) for _ in range(args.num_microbatches)]
    ts = [torch.randn(shape, generator=g) for _ in range(args.num_microbatches)]
    best = None
    for _ in range(args.repeats + 1):  # the first run warms up (allocations, connections)
        for q in layers.parameters():
            q.grad = None
        recorder = Recorder(group)
        forward_backward(chunks, name, xs, ts, F.mse_loss, group=group, recorder=recorder)
        events = recorder.gather()
        span = max(e.end for r in events for e in r) - min(e.start for r in events for e in r)
        if best is None or span < best[0]:
            best = (span, events)
    serial_forward_backward(reference, xs, ts, F.mse_loss)
    mine = [i for r in chunk_layer_ranges(args.num_layers, p, v)[stage] for i in r]
    error = torch.tensor([largest(max_abs_error(a.grad, b.grad) for i in mine
                                  for a, b in zip(layers[i].parameters(), reference[i].parameters()))])
    dist.all_reduce(error, op=dist.ReduceOp.MAX, group=group)
    return best[1], error.item()


def main() -> int:
    args = parse_args()
    start_ranks(args)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    group = parallel_state.get_pipeline_model_parallel_group()
    p, m, v = dist.get_world_size(group), args.num_microbatches, args.virtual_pipeline_model_parallel_size
    cost = f"emulated cost {args.cost_ms:g} ms forward / {2 * args.cost_ms:g} ms backward per layer" if args.cost_ms else "real CPU compute only"
    print_rank_0(f"p={p} ranks, m={m} microbatches, {args.num_layers} layers of hidden {args.hidden_size}, {cost}")
    cases = [("gpipe", 1), ("1f1b", 1), ("interleaved", v)]
    fig, axes = plt.subplots(len(cases), 2, figsize=(15, 2.2 * len(cases) * max(1, p / 4) + 1), squeeze=False)
    ok = True
    print_rank_0(f"{'schedule':16s} {'bubble/step':>11s} {'theory':>7s} {'bubble/ideal':>12s} {'theory':>7s}  matches serial")
    for row, (name, chunks) in enumerate(cases):
        events, error = run(name, chunks, args, group)
        passed = within(error, TOLERANCE)
        ok &= passed
        fraction, relative = measured_bubble(events)
        t_fraction, t_relative = theoretical_bubble(p, m, chunks)
        label = f"{name} v={chunks}" if name == "interleaved" else name
        print_rank_0(f"{label:16s} {fraction:11.3f} {t_fraction:7.3f} {relative:12.3f} {t_relative:7.3f}  {passed}")
        if dist.get_rank() == 0:
            ideal = events_from_grid(simulate(get_schedule(name, p, m, chunks), 1, 2), step_time=1.0 / chunks)
            draw(ideal, axes[row][0], f"{label}: schedule, unit time (bubble {t_fraction:.0%} of the step)", unit="forward times of one stage")
            ms = [[e._replace(start=e.start * 1000, end=e.end * 1000) for e in r] for r in events]
            draw(ms, axes[row][1], f"{label}: measured (bubble {fraction:.0%} of the step)", unit="ms")
    print_rank_0(f"every schedule's gradients match the single-process model (max error < {TOLERANCE:g}): {ok}")
    if dist.get_rank() == 0:
        fig.suptitle(f"Pipeline timelines, p={p}, m={m}: forward blue, backward green, darker = later model chunk; numbers = microbatch")
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"timeline written to {args.out}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
