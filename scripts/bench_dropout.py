"""Our dropout (15-bit masks, lessons_pkg/tensor_parallel/dropout.py) against ``F.dropout`` on the CPU.

    python scripts/bench_dropout.py                       # the course trainer's shapes, 9 rounds
    python scripts/bench_dropout.py --threads 1 --clock cpu

Shapes of the course's trainer (micro-batch 8, 8 heads, sequence 256, hidden 256): the attention
probabilities ``[8, 8, 256, 256]`` and the residual stream ``[8, 256, 256]``. For each, the mask
alone (``bernoulli_`` against :func:`keep_mask`), the dropout forward, and forward+backward
(``torch.autograd.grad``), timed in alternating rounds with the kernel benchmark's protocol
(``lessons_pkg.kernels.bench.interleaved_best_ms``: rotating order, steady state, best round).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lessons_pkg.kernels import bench  # noqa: E402
from lessons_pkg.tensor_parallel.dropout import _quantization_fits, dropout, keep_mask  # noqa: E402

SHAPES = {"attention probabilities": (8, 8, 256, 256), "residual stream": (8, 256, 256)}


def run(shapes: dict[str, tuple[int, ...]], p: float = 0.1, rounds: int = 9) -> list[dict]:
    """One row per shape and pass: ms of F.dropout and of ours, and the speed-up."""
    device = torch.device("cpu")
    rows = []
    for name, shape in shapes.items():
        x = torch.randn(*shape, requires_grad=True)
        grad = torch.randn(*shape)
        cases = {
            "mask": {"F.dropout": lambda: torch.empty(shape).bernoulli_(1 - p),
                     "ours": lambda: keep_mask(shape, p)},
            "forward": {"F.dropout": lambda: F.dropout(x.detach(), p, True),
                        "ours": lambda: dropout(x.detach(), p)},
            "forward+backward": {"F.dropout": lambda: torch.autograd.grad(F.dropout(x, p, True), x, grad),
                                 "ours": lambda: torch.autograd.grad(dropout(x, p), x, grad)},
        }
        for passes, fns in cases.items():
            ms = bench.interleaved_best_ms(fns, device, rounds)
            rows.append({"tensor": f"{name} {list(shape)}", "pass": passes, **ms,
                         "speedup": ms["F.dropout"] / ms["ours"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| tensor | pass | F.dropout ms | ours ms | ours vs F.dropout |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['tensor']} | {r['pass']} | {r['F.dropout']:.3f} | {r['ours']:.3f} | {r['speedup']:.2f}x |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clock", choices=sorted(bench.CLOCKS), default="wall")
    parser.add_argument("--p", type=float, default=0.1, help="drop probability (default 0.1, the trainer's)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (seconds; for the tests)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1")
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got --rounds {args.rounds} --threads {args.threads}")
    if not _quantization_fits(args.p):  # else dropout() is F.dropout and the table compares it with itself
        parser.error(f"--p {args.p}: the 15-bit path serves 0.0077 <= p < 0.99998 (|p' - p| <= 0.2% p); "
                     f"outside it dropout() calls F.dropout")
    torch.set_num_threads(args.threads)
    bench.set_clock(args.clock)
    shapes = {"small": (4, 64, 64)} if args.small else SHAPES
    print(f"machine: {bench.machine_description()}; clock: {args.clock}; p={args.p}; best of {args.rounds} "
          f"alternating rounds", flush=True)
    print(format_table(run(shapes, args.p, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
