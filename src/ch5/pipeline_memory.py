"""Measure the activation memory of GPipe and 1F1B on every stage as the number of microbatches grows.

    python src/ch5/pipeline_memory.py [--nproc 4] [--microbatches 2 4 8 16]    # or under torchrun

First the idea on one process: a custom ``autograd.Function`` that saves its
input in ``ctx`` holds that memory until its backward; one that saves nothing
holds none. Then each pipeline rank counts, with saved-tensor hooks
(``lessons_pkg/pipeline/memory.py``), the peak bytes of activations saved for
backward during one forward/backward of the whole batch, for GPipe,
1F1B and interleaved 1F1B (shown, not checked: its warm-up keeps more
microbatch-chunks in flight) at several m. One microbatch's activations on a
stage, ``A``, are measured with m = 1. The script checks the two facts of the
lesson, from the measurements:

    GPipe   peak on stage r = m * A_r                 (every microbatch is in flight before the first backward)
    1F1B    peak on stage r = min(m, p - r) * A_r     (bounded by p microbatches on stage 0, whatever m)

and exits with status 1 if either fails. Writes ``outputs/ch5/pipeline_memory.png``.
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lessons_pkg.launch import add_nproc_argument, start_ranks  # noqa: E402
from lessons_pkg import parallel_state  # noqa: E402
from lessons_pkg.pipeline import forward_backward  # noqa: E402
from lessons_pkg.pipeline.memory import Double, SavedTensorMeter, Square  # noqa: E402
from lessons_pkg.pipeline.partition import chunks_for_rank, toy_layers  # noqa: E402
from lessons_pkg.utils import print_rank_0  # noqa: E402

MiB = 2**20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=2)
    parser.add_argument("--out", default="outputs/ch5/pipeline_memory.png")
    add_nproc_argument(parser, default=4)
    return parser.parse_args()


def saved_for_backward_demo() -> None:
    x = torch.randn(1024, 256, requires_grad=True)  # 1 MiB
    with SavedTensorMeter() as meter:
        y = Square.apply(x)  # ctx.save_for_backward(x)
        after_square = meter.live
        z = Double.apply(x)  # saves nothing: the gradient is the constant 2
        after_double = meter.live
        (y.sum() + z.sum()).backward()
    print_rank_0(f"x holds {x.nbytes / MiB:.1f} MiB; saved for backward after Square: {after_square / MiB:.1f} MiB, "
                 f"after Double as well: {after_double / MiB:.1f} MiB, after the backward: {meter.live / MiB:.1f} MiB")


def peak_bytes(name: str, m: int, v: int, args, group) -> int:
    p, stage = dist.get_world_size(group), dist.get_rank(group)
    layers = toy_layers(args.num_layers, args.hidden_size, seed=0)
    chunks = chunks_for_rank(layers, stage, p, v)
    shape = (args.micro_batch_size, args.seq_length, args.hidden_size)  # [batch, seq, hidden]
    xs = [torch.randn(shape) for _ in range(m)] if stage == 0 else None
    ts = [torch.randn(shape) for _ in range(m)] if stage == p - 1 else None
    with SavedTensorMeter(exclude=layers.parameters()) as meter:
        forward_backward(chunks, name, xs, ts, F.mse_loss, group=group, num_microbatches=m)
    return meter.peak


def main() -> int:
    args = parse_args()
    start_ranks(args)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    group = parallel_state.get_pipeline_model_parallel_group()
    p, stage, v = dist.get_world_size(group), dist.get_rank(group), args.virtual_pipeline_model_parallel_size
    saved_for_backward_demo()

    mine = {"A": peak_bytes("gpipe", 1, 1, args, group)}  # one microbatch's activations on this stage
    # (schedule, v, the m it runs at): interleaved needs m to be a multiple of p
    cases = [("gpipe", 1, args.microbatches), ("1f1b", 1, args.microbatches),
             ("interleaved", v, [m for m in args.microbatches if m % p == 0])]
    for name, chunks, ms in cases:
        for m in ms:
            mine[(name, m)] = peak_bytes(name, m, chunks, args, group)
    everyone = [None] * p
    dist.all_gather_object(everyone, mine, group=group)

    ok = True
    print_rank_0(f"\npeak activation memory per stage, MiB (and in units of one microbatch's activations A_r), p={p}")
    print_rank_0(f"{'schedule':16s} {'m':>3s} " + " ".join(f"{'stage ' + str(r):>16s}" for r in range(p)))
    for name, chunks, ms in cases:
        for m in ms:
            cells = []
            for r in range(p):
                peak, one = everyone[r][(name, m)], everyone[r]["A"]
                cells.append(f"{peak / MiB:7.2f} ({peak / one:4.1f} A)")
                if name == "gpipe":
                    ok &= peak == m * one
                elif name == "1f1b":
                    ok &= peak == min(m, p - r) * one
            label = f"{name} v={chunks}" if name == "interleaved" else name
            print_rank_0(f"{label:16s} {m:3d} " + " ".join(f"{c:>16s}" for c in cells))
    print_rank_0(f"GPipe's peak is m x A_r and 1F1B's min(m, p - r) x A_r on every stage, as measured: {ok}")

    if dist.get_rank() == 0:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = {"gpipe": "-o", "1f1b": "--s", "interleaved": ":^"}
        for name, chunks, ms in cases:
            for r in range(p):
                label = f"{name}{f' v={chunks}' if name == 'interleaved' else ''}, stage {r}"
                ax.plot(ms, [everyone[r][(name, m)] / MiB for m in ms], styles[name],
                        color=plt.cm.viridis(r / max(1, p - 1)), label=label)
        ax.set_xlabel("microbatches m")
        ax.set_ylabel("peak activations saved for backward (MiB)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.microbatches, [str(m) for m in args.microbatches])
        ax.set_title(f"Activation memory per stage, p={p}: GPipe grows with m, 1F1B stays at p - r microbatches", fontsize=9)
        ax.legend(fontsize=7, ncol=len(cases))
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"memory plot written to {args.out}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
