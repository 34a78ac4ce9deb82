"""Train with our GPipe, 1F1B and interleaved 1F1B schedules and check every step against one process.

    python src/ch5/schedules_verify.py [--nproc 2]      # 4 ranks by default; or torchrun --nproc_per_node 4

Every rank builds the same full model (a stack of Linear + tanh layers, seeded)
and a serial copy of it. For each schedule the pipeline trains its chunks with
SGD for a few steps, fitting ``0.5 sin(x)`` on one fixed batch, while the
serial copy trains on the same batch; after each step the largest
difference in the loss and in every gradient is taken over all ranks. The
script exits with status 1 if any exceeds the tolerance.
"""
from __future__ import annotations

import argparse
import os
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.utils import largest, max_abs_error, within
from lessons_pkg.pipeline import forward_backward, get_schedule, serial_forward_backward
from lessons_pkg.pipeline.partition import chunk_layer_ranges, chunks_for_rank, toy_layers
from lessons_pkg.pipeline.schedules import format_table, simulate
from lessons_pkg.utils import print_rank_0

TOLERANCE = 1e-5  # float32; only the order of summing microbatch gradients differs from the serial run


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2, help="v of the interleaved schedule")
    parser.add_argument("--train-iters", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.5)
    add_nproc_argument(parser, default=4)
    return parser.parse_args()


def train_and_compare(name: str, v: int, args, group) -> tuple[float, bool]:
    """Train ``args.train_iters`` steps with schedule ``name``; return (largest error over steps and ranks, loss fell)."""
    p, stage = dist.get_world_size(group), dist.get_rank(group)
    layers = toy_layers(args.num_layers, args.hidden_size, seed=1234)
    reference = copy.deepcopy(layers)
    chunks = chunks_for_rank(layers, stage, p, v)
    mine = [i for r in chunk_layer_ranges(args.num_layers, p, v)[stage] for i in r]
    params = [q for i in mine for q in layers[i].parameters()]
    optimizer = torch.optim.SGD(params, lr=args.lr)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=args.lr)
    shape = (args.micro_batch_size, args.seq_length, args.hidden_size)  # [batch, seq, hidden]
    worst, means = 0.0, []
    for _ in range(args.train_iters):
        g = torch.Generator().manual_seed(0)  # the same batch on every rank and at every step
        xs = [torch.randn(shape, generator=g) for _ in range(args.num_microbatches)]
        ts = [0.5 * torch.sin(x) for x in xs]  # a target the model can learn: the loss falls
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
        losses = forward_backward(chunks, name, xs, ts, F.mse_loss, group=group)
        ref_losses = serial_forward_backward(reference, xs, ts, F.mse_loss)
        error = largest(max_abs_error(a.grad, b.grad) for i in mine
                        for a, b in zip(layers[i].parameters(), reference[i].parameters()))
        if losses is not None:
            error = largest([error, max_abs_error(torch.stack(losses), torch.stack(ref_losses))])
            means.append(torch.stack(losses).mean().item())
        optimizer.step()
        ref_optimizer.step()
        worst = largest([worst, error])  # inf (never NaN) if anything was not finite
    falling = True
    if means:  # the last stage
        falling = all(b < a for a, b in zip(means, means[1:]))
        print(f"{name}: the mean microbatch loss falls at every one of {args.train_iters} SGD steps: {falling}")
    result = torch.tensor([worst, 0.0 if falling else 1.0])  # the last stage's verdict reaches every rank
    dist.all_reduce(result, op=dist.ReduceOp.MAX, group=group)
    return result[0].item(), result[1].item() == 0.0


def main() -> int:
    args = parse_args()
    start_ranks(args)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    group = parallel_state.get_pipeline_model_parallel_group()
    p, m, v = dist.get_world_size(group), args.num_microbatches, args.virtual_pipeline_model_parallel_size
    print_rank_0(f"pipeline of {p} ranks, {args.num_layers} layers, {m} microbatches of {args.micro_batch_size}")
    ok = True
    for name, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", v)):
        print_rank_0(f"\n== {name} (v={chunks}), the order each rank runs (unit-time clock) ==")
        print_rank_0(format_table(simulate(get_schedule(name, p, m, chunks))))
        error, falling = train_and_compare(name, chunks, args, group)
        passed = within(error, TOLERANCE)
        ok &= passed and falling
        print_rank_0(f"{name}: losses and every gradient match the single-process model "
                     f"over {args.train_iters} SGD steps (max error < {TOLERANCE:g}): {passed}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
