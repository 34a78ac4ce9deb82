"""Benchmark the fused kernels against eager PyTorch and ``torch.compile`` of the same steps.

    python -m lessons_pkg.kernels.bench            # transformer-sized shapes (a few minutes on 2 cores)
    python -m lessons_pkg.kernels.bench --quick    # small shapes, for `make course` and the notebook

For each op, forward and forward+backward, it prints the best time of several
runs (the least disturbed by other work on the machine) of three
implementations of the same maths:

    fused     lessons_pkg.kernels (one compiled kernel per pass)
    eager     lessons_pkg.kernels.reference (one PyTorch op per step)
    compile   torch.compile(reference): PyTorch's own fusing compiler

and the fused kernel's achieved bandwidth: the bytes the op must move at the
least (read its inputs once, write its outputs once; below) divided by the
time, next to the machine's measured copy bandwidth (``y.copy_(x)``), the
ceiling for a memory-bound op.

Minimum bytes, with E the element count of x and s its element size:
    bias_gelu   forward 2 E s (read x, write y);  backward 3 E s (read gy, x; write gx)
    softmax     forward 2 E s (+ the bool mask, E / heads bytes);  backward 3 E s (read gp, p; write gx)
    layer_norm  forward 2 E s;  backward 3 E s
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from lessons_pkg import kernels
from lessons_pkg.kernels import reference

FULL = {"bias_gelu": (8192, 3072), "softmax": (4, 12, 512, 512), "layer_norm": (8192, 1024)}
QUICK = {"bias_gelu": (1024, 1024), "softmax": (2, 12, 128, 128), "layer_norm": (2048, 512)}


@dataclass
class Row:
    op: str
    shape: str
    passes: str  # "forward" or "forward+backward"
    fused_ms: float
    eager_ms: float
    compile_ms: float | None
    min_bytes: int

    @property
    def fused_gbps(self) -> float:
        return self.min_bytes / self.fused_ms / 1e6

    @property
    def vs_eager(self) -> float:
        return self.eager_ms / self.fused_ms

    @property
    def vs_compile(self) -> float | None:
        return None if self.compile_ms is None else self.compile_ms / self.fused_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def set_clock(name: str) -> None:
    """Time with ``"wall"`` (elapsed) or ``"cpu"`` (this process's CPU time: on a machine shared
    with other jobs it is not inflated by them; with one thread it equals the elapsed time of an idle machine)."""
    global _clock
    _clock = CLOCKS[name]


def best_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` timed runs, in ms: noise (other processes, interrupts) only adds time."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        _sync(device)
        times.append((_clock() - start) * 1e3)
    return min(times)


def copy_bandwidth_gbps(device: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by ``y.copy_(x)`` on ``mbytes`` MB: the practical memory ceiling."""
    x = torch.empty(mbytes * 2**20 // 4, device=device).normal_()
    y = torch.empty_like(x)
    ms = best_ms(lambda: y.copy_(x), device, repeats)
    return 2 * x.numel() * 4 / ms / 1e6


def _cases(shapes: dict, device: torch.device):
    """(op name, shape string, function of the inputs, inputs, min bytes forward, min bytes backward)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    rows, h = shapes["bias_gelu"]
    x, b = rand(rows, h), rand(h)
    e = x.numel() * 4
    yield "bias_gelu", f"{rows}x{h}", (kernels.bias_gelu, reference.bias_gelu), (x, b), 2 * e, 3 * e

    batch, heads, sq, sk = shapes["softmax"]
    s = rand(batch, heads, sq, sk)
    mask = (torch.rand(batch, 1, sq, sk, generator=g) < 0.1).to(device)
    e = s.numel() * 4
    scale = 0.125
    yield ("scaled_masked_softmax", f"{batch * heads}x{sq}x{sk}",
           (lambda t: kernels.scaled_masked_softmax(t, mask, scale),
            lambda t: reference.scaled_masked_softmax(t, mask, scale)),
           (s,), 2 * e + mask.numel(), 3 * e)
    c = s.view(batch * heads, sq, sk)
    yield ("causal_softmax", f"{batch * heads}x{sq}x{sk}",
           (lambda t: kernels.scaled_upper_triang_masked_softmax(t, scale),
            lambda t: reference.scaled_upper_triang_masked_softmax(t, scale)),
           (c,), 2 * e, 3 * e)

    rows, h = shapes["layer_norm"]
    x, w, b = rand(rows, h), rand(h), rand(h)
    e = x.numel() * 4
    yield ("layer_norm", f"{rows}x{h}",
           (lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)),
           (x, w, b), 2 * e, 3 * e)


def _forward_backward(fn, inputs):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    grad = torch.ones_like(fn(*leaves))

    def step():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad)

    return step


def run(quick: bool = False, device: str = "cpu", repeats: int | None = None, compile: bool = True,
        log: Callable[[str], None] = print) -> list[Row]:
    """Time every op; return the rows of the table (and log progress through ``log``)."""
    device = torch.device(device)
    repeats = repeats or (5 if quick else 7)
    kernels.bias_gelu(torch.ones(1, 1, device=device), torch.ones(1, device=device))  # compile/load first
    rows = []
    for op, shape, (fused, eager), inputs, bytes_fwd, bytes_bwd in _cases(QUICK if quick else FULL, device):
        compiled = torch.compile(eager, dynamic=False) if compile else None
        for passes, make in (("forward", lambda f: (lambda: f(*inputs))),
                             ("forward+backward", lambda f: _forward_backward(f, inputs))):
            with torch.no_grad() if passes == "forward" else torch.enable_grad():
                t_fused = best_ms(make(fused), device, repeats)
                t_eager = best_ms(make(eager), device, repeats)
                t_compile = best_ms(make(compiled), device, repeats, warmup=3) if compiled else None
            nbytes = bytes_fwd if passes == "forward" else bytes_fwd + bytes_bwd
            rows.append(Row(op, shape, passes, t_fused, t_eager, t_compile, nbytes))
            log(f"  timed {op} {passes}")
    return rows


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads used, torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), load average {load}")


def format_table(rows: list[Row], ceiling_gbps: float) -> str:
    lines = [
        "| op | shape | pass | fused ms | eager ms | compile ms | fused GB/s | fused vs eager | fused vs compile |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        compile_ms = "-" if r.compile_ms is None else f"{r.compile_ms:.2f}"
        vs_compile = "-" if r.vs_compile is None else f"{r.vs_compile:.2f}x"
        lines.append(f"| {r.op} | {r.shape} | {r.passes} | {r.fused_ms:.2f} | {r.eager_ms:.2f} | {compile_ms} | "
                     f"{r.fused_gbps:.1f} | {r.vs_eager:.2f}x | {vs_compile} |")
    lines.append(f"\nmeasured copy bandwidth (y.copy_(x), read + write): {ceiling_gbps:.1f} GB/s")
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """The CPU targets, forward+backward: >= 1.5x eager and >= torch.compile; met or the gap."""
    out = []
    for r in rows:
        if r.passes != "forward+backward":
            continue
        eager_ok = r.vs_eager >= 1.5
        line = f"{r.op}: {r.vs_eager:.2f}x eager ({'met' if eager_ok else 'NOT met'}: target 1.5x)"
        if r.vs_compile is not None:
            compile_ok = r.vs_compile >= 1.0
            line += f", {r.vs_compile:.2f}x torch.compile ({'met' if compile_ok else 'NOT met'}: target 1.0x)"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessons_pkg.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds, for make course / notebook)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: every core)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (the best is shown)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for minutes)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which other processes on a shared "
                             "machine do not inflate (use with --threads 1: it sums over threads)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1 on the CPU")
    set_clock(args.clock)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine_description(args.device)}; clock: {args.clock}", flush=True)
    ceiling = copy_bandwidth_gbps(torch.device(args.device), mbytes=64 if args.quick else 256)
    rows = run(quick=args.quick, device=args.device, repeats=args.repeats, compile=not args.no_compile,
               log=lambda m: print(m, flush=True))
    print(format_table(rows, ceiling))
    print("\ntargets (forward+backward):")
    for line in targets(rows):
        print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device), "copy_gbps": ceiling,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
