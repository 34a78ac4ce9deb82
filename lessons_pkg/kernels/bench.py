"""Benchmark the fused kernels against what a user would call instead.

    python -m lessons_pkg.kernels.bench                      # the issue's shapes and the course's (minutes on 2 cores)
    python -m lessons_pkg.kernels.bench --quick --no-compile # small shapes, seconds (make course)
    python -m lessons_pkg.kernels.bench --output docs/kernels.md   # also write the table to a file

For each op and shape, forward and forward+backward, four implementations of the same maths:

    fused     lessons_pkg.kernels: one compiled kernel per pass
    eager     the native PyTorch op a user calls: F.gelu(x + b, approximate="tanh"),
              torch.softmax after masked_fill, F.layer_norm
    unfused   lessons_pkg.kernels.reference: the formula one PyTorch op per step (the lesson's strawman)
    compile   torch.compile of the eager function (inductor, dynamic=False)

Timing: ``--rounds`` rounds; in each round every implementation runs once, in turn, the
order rotating from round to round (so a burst of load from other processes hits all of
them alike, and none always runs after the same other one), and each reports its fastest
round (noise only adds time). A sample is an implementation's steady state, as in a
training loop: untimed calls for about 5 ms, then the mean of consecutive calls lasting about 10 ms;
``--cold`` times single calls on caches flushed just before instead (``interleaved_best_ms``). With ``--clock cpu`` and ``--threads 1`` it measures
this process's CPU time instead of the wall clock (stable on a shared machine).

Also printed: the fused kernel's achieved bandwidth (the least bytes the op must move /
time) and arithmetic rate (approximate FLOPs / time), next to the machine's measured copy
bandwidth (``y.copy_(x)`` on 256 MB, 64 MB with ``--quick``: the memory roof) and matrix-multiply
rate (the compute roof): the data of a roofline plot (chapters/06b_fused_kernels.ipynb).

And, timed in the same rounds, the **stream** time: element-wise PyTorch ops that move the op's
least bytes at the same size (forward ``y = 2 x``; backward ``gx = gy + x``; the masked softmax's
mask, E / heads bytes, left out), into buffers reused from call to call as the kernels' outputs are.
It is the memory floor at that size: tensors of a few MB stay in the last-level cache, which moves
them several times faster than the 256 MB copy, so there the copy-bandwidth roof is too low, and
"fused / stream" says how close a kernel is to being bound by its bytes (1.0: as fast as moving them).

Minimum bytes, with E the element count of x and s its element size:
    bias_gelu   forward 2 E s (read x, write y);  backward 3 E s (read gy, x; write gx)
    softmax     forward 2 E s (+ the bool mask, E / heads bytes);  backward 3 E s (read gp, p; write gx)
    layer_norm  forward 2 E s;  backward 3 E s
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lessons_pkg import kernels
from lessons_pkg.kernels import reference

# The shapes of the issue (transformer-sized) and of the course's trainer benchmark
# (4 layers, hidden 256, 8 heads, sequence 256, micro-batch 8: 2048 token rows).
SHAPES = {
    "issue": {"bias_gelu": (4096, 3072), "softmax": (4, 12, 512, 512), "layer_norm": (8192, 1024)},
    "course": {"bias_gelu": (2048, 1024), "softmax": (8, 8, 256, 256), "layer_norm": (2048, 256)},
    "quick": {"bias_gelu": (1024, 1024), "softmax": (2, 12, 128, 128), "layer_norm": (2048, 512)},
}

# Approximate floating-point operations per element (forward, backward) of the fused kernels,
# counted from csrc/*.cpp; exp_u20 counted as 12 (range reduction + degree-5 polynomial + scaling).
FLOPS_PER_ELEMENT = {
    "bias_gelu": (21, 32),
    "scaled_masked_softmax": (17, 5),
    "causal_softmax": (17, 5),
    "layer_norm": (12, 16),
}

IMPLEMENTATIONS = ("fused", "eager", "unfused", "compile")


@dataclass
class Row:
    op: str
    shape: str
    passes: str  # "forward" or "forward+backward"
    ms: dict[str, float] = field(default_factory=dict)  # implementation -> best time
    min_bytes: int = 0
    flops: float = 0.0
    stream_ms: float | None = None  # element-wise ops moving the same least bytes (see the module docstring)

    @property
    def fused_gbps(self) -> float:
        return self.min_bytes / self.ms["fused"] / 1e6

    @property
    def fused_gflops(self) -> float:
        return self.flops / self.ms["fused"] / 1e6

    def speedup(self, other: str) -> float | None:
        return self.ms[other] / self.ms["fused"] if other in self.ms else None

    @property
    def vs_stream(self) -> float | None:
        """fused time / stream time: 1.0 means the kernel is as fast as moving its least bytes at this size."""
        return self.ms["fused"] / self.stream_ms if self.stream_ms else None


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


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = _clock()
    fn()
    _sync(device)
    return (_clock() - start) * 1e3


def best_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """The fastest of ``repeats`` timed runs of one function, in ms."""
    for _ in range(warmup):
        fn()
    return min(_time_once(fn, device) for _ in range(repeats))


class CacheFlush:
    """Writes a buffer larger than the last-level cache, evicting everything else (for ``--cold``)."""

    def __init__(self, device: torch.device, mbytes: int = 256):
        self.buffer = torch.empty(mbytes * 2**20 // 4, device=device)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)


def _time_calls(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """The mean time of ``calls`` consecutive calls, in ms."""
    _sync(device)
    start = _clock()
    for _ in range(calls):
        fn()
    _sync(device)
    return (_clock() - start) * 1e3 / calls


def interleaved_best_ms(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                        warmup: int = 2, flush: Callable[[], None] | None = None,
                        sample_ms: float = 10.0) -> dict[str, float]:
    """Time several functions in alternating rounds; each one's fastest round, in ms per call.

    Each round takes one sample of every function, starting with a different one each round
    (f1 f2 f3, f2 f3 f1, f3 f1 f2, ...), so that no function always follows the same other one.
    A sample is a function's steady state, as in a training loop that calls the op every layer
    of every iteration: untimed calls for about half of ``sample_ms`` (``calls // 2`` of them for
    ``calls`` timed ones, at least 1), then the mean of ``calls`` consecutive calls, enough to last
    about ``sample_ms`` (at least 2). Calls timed right after another function measure the state that function left
    behind, and it takes more than one call to leave it: here our LayerNorm (2048x256, forward+backward,
    0.27 ms in steady state) took 0.52, 0.34, 0.28 and 0.27 ms in its first four calls after
    ``F.layer_norm`` (whose fresh, page-faulting outputs sweep the caches), and 1.00, 0.52, 0.30 and
    0.29 ms after the step-by-step formula (medians of 5).
    With ``flush`` (:class:`CacheFlush`) every sample is one call on cold caches instead, flushed
    just before it, for every function alike.
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        once = _time_once(fn, device)
        calls[name] = 1 if flush is not None else max(2, min(1000, math.ceil(sample_ms / max(once, 1e-3))))
    names = list(fns)
    times = {name: [] for name in fns}
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            if flush is not None:
                flush()
            else:
                for _ in range(max(1, calls[name] // 2)):
                    fns[name]()
            times[name].append(_time_calls(fns[name], device, calls[name]))
    return {name: min(t) for name, t in times.items()}


def copy_bandwidth_gbps(device: torch.device, mbytes: int = 256, repeats: int = 5) -> float:
    """Bytes read + written per second by ``y.copy_(x)`` on ``mbytes`` MB: the practical memory ceiling."""
    x = torch.empty(mbytes * 2**20 // 4, device=device).normal_()
    y = torch.empty_like(x)
    ms = best_ms(lambda: y.copy_(x), device, repeats)
    return 2 * x.numel() * 4 / ms / 1e6


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Float32 FLOP/s of ``a @ b`` (n x n): the practical arithmetic ceiling (vector FMA units busy)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    ms = best_ms(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2 * n**3 / ms / 1e6


def _cases(shapes: dict, device: torch.device):
    """(op, shape string, {implementation: function}, inputs, min bytes forward, min bytes backward, E)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    rows, h = shapes["bias_gelu"]
    x, b = rand(rows, h), rand(h)
    e = x.numel() * 4
    yield ("bias_gelu", f"{rows}x{h}",
           {"fused": kernels.bias_gelu, "eager": lambda x, b: F.gelu(x + b, approximate="tanh"),
            "unfused": reference.bias_gelu}, (x, b), 2 * e, 3 * e, x.numel())

    batch, heads, sq, sk = shapes["softmax"]
    s = rand(batch, heads, sq, sk)
    mask = (torch.rand(batch, 1, sq, sk, generator=g) < 0.1).to(device)  # no row fully masked at these sizes
    e = s.numel() * 4
    scale = 0.125
    yield ("scaled_masked_softmax", f"{batch}x{heads}x{sq}x{sk}",
           {"fused": lambda t: kernels.scaled_masked_softmax(t, mask, scale),
            "eager": lambda t: torch.softmax((t * scale).masked_fill(mask, float("-inf")), dim=-1),
            "unfused": lambda t: reference.scaled_masked_softmax(t, mask, scale)},
           (s,), 2 * e + mask.numel(), 3 * e, s.numel())
    c = s.view(batch * heads, sq, sk)
    future = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)
    yield ("causal_softmax", f"{batch * heads}x{sq}x{sk}",
           {"fused": lambda t: kernels.scaled_upper_triang_masked_softmax(t, scale),
            "eager": lambda t: torch.softmax((t * scale).masked_fill(future, float("-inf")), dim=-1),
            "unfused": lambda t: reference.scaled_upper_triang_masked_softmax(t, scale)},
           (c,), 2 * e, 3 * e, c.numel())

    rows, h = shapes["layer_norm"]
    x, w, b = rand(rows, h), rand(h), rand(h)
    e = x.numel() * 4
    yield ("layer_norm", f"{rows}x{h}",
           {"fused": lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
            "eager": lambda x, w, b: F.layer_norm(x, (x.size(-1),), w, b, 1e-5),
            "unfused": lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)},
           (x, w, b), 2 * e, 3 * e, x.numel())


def _stream(x: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:
    """Forward and forward+backward stand-ins that move a kernel's least bytes and do no other work.

    forward:           y = 2 x             reads E, writes E elements (the kernels' 2 E s bytes)
    forward+backward:  and gx = gy + x     reads 2 E, writes E more (3 E s)
    Outputs go to buffers reused from call to call, as the kernels' outputs come from their cache.
    """
    y, gy, gx = torch.empty_like(x), torch.ones_like(x), torch.empty_like(x)

    def forward():
        torch.mul(x, 2.0, out=y)

    def forward_backward():
        torch.mul(x, 2.0, out=y)
        torch.add(gy, x, out=gx)

    return forward, forward_backward


def _forward_backward(fn, inputs):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    grad = torch.ones_like(fn(*leaves))

    def step():
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, grad)

    return step


def run(shapes: str | dict = "course", device: str = "cpu", rounds: int = 7, compile: bool = True,
        unfused: bool = True, cold: bool = False, log: Callable[[str], None] = print) -> list[Row]:
    """Time every op at ``shapes`` (a key of :data:`SHAPES` or a dict like its values); return the rows.
    ``cold``: flush the caches before every timed call (see :func:`interleaved_best_ms`)."""
    device = torch.device(device)
    flush = CacheFlush(device) if cold else None
    shapes = SHAPES[shapes] if isinstance(shapes, str) else shapes
    kernels.bias_gelu(torch.ones(1, 1, device=device), torch.ones(1, device=device))  # compile/load first
    rows = []
    for op, shape, fns, inputs, bytes_fwd, bytes_bwd, elements in _cases(shapes, device):
        if not unfused:
            fns.pop("unfused")
        if compile:
            fns["compile"] = torch.compile(fns["eager"], dynamic=False)
        flops_fwd, flops_bwd = FLOPS_PER_ELEMENT[op]
        stream = dict(zip(("forward", "forward+backward"), _stream(inputs[0])))
        for passes in ("forward", "forward+backward"):
            if passes == "forward":
                steps = {name: (lambda f: (lambda: f(*inputs)))(f) for name, f in fns.items()}
            else:
                steps = {name: _forward_backward(f, inputs) for name, f in fns.items()}
            steps["stream"] = stream[passes]  # timed in the same rounds, reported apart (not an implementation)
            with torch.no_grad() if passes == "forward" else torch.enable_grad():
                ms = interleaved_best_ms(steps, device, rounds, warmup=3, flush=flush)
            stream_ms = ms.pop("stream")
            fwd_only = passes == "forward"
            rows.append(Row(op, shape, passes, ms, bytes_fwd if fwd_only else bytes_fwd + bytes_bwd,
                            elements * (flops_fwd if fwd_only else flops_fwd + flops_bwd), stream_ms))
            log(f"  timed {op} {shape} {passes}")
    return rows


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, host load average {load}"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads used, torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), load average {load}")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(rows: list[Row], ceiling_gbps: float, peak_gflops: float | None = None) -> str:
    names = [n for n in IMPLEMENTATIONS if any(n in r.ms for r in rows)]
    lines = ["| op | shape | pass | " + " | ".join(f"{n} ms" for n in names)
             + " | stream ms | fused GB/s | fused GFLOP/s | vs eager | vs compile | vs unfused | fused / stream |",
             "|---|---|---|" + "---:|" * (len(names) + 7)]
    for r in rows:
        times = " | ".join(f"{r.ms[n]:.3f}" if n in r.ms else "-" for n in names)
        stream = "-" if r.stream_ms is None else f"{r.stream_ms:.3f}"
        lines.append(f"| {r.op} | {r.shape} | {r.passes} | {times} | {stream} | {r.fused_gbps:.1f} | "
                     f"{r.fused_gflops:.1f} | {_x(r.speedup('eager'))} | {_x(r.speedup('compile'))} | "
                     f"{_x(r.speedup('unfused'))} | {_x(r.vs_stream)} |")
    if any(r.stream_ms is not None for r in rows):
        lines.append("\nstream: element-wise ops moving the same least bytes at the same size (forward y = 2x, "
                     "backward gx = gy + x, reused output buffers), timed in the same rounds: the memory floor "
                     "there; fused / stream = 1.00x means as fast as moving the bytes")
    lines.append(f"\nmeasured copy bandwidth (y.copy_(x), read + write): {ceiling_gbps:.1f} GB/s")
    if peak_gflops is not None:
        lines.append(f"measured float32 matrix-multiply rate (1024^3): {peak_gflops:.1f} GFLOP/s")
    return "\n".join(lines)


def _floor3(ratio: float) -> str:
    """Three decimals, rounded down: a ratio just under a target never prints as the target
    (1.4996 is "1.499", not "1.500"; rounded to two it would even read "1.50x (NOT met)")."""
    if not math.isfinite(ratio):  # a broken timing: show it as it is (and its verdict is "NOT met")
        return str(ratio)
    return f"{math.floor(ratio * 1000) / 1000:.3f}"


def targets(rows: list[Row]) -> list[str]:
    """The targets, forward+backward: fused >= 1.5x the native op (eager) and >= torch.compile; met or the gap."""
    out = []
    for r in rows:
        if r.passes != "forward+backward":
            continue
        vs_eager = r.speedup("eager")
        line = f"{r.op} {r.shape}: {_floor3(vs_eager)}x eager ({'met' if vs_eager >= 1.5 else 'NOT met'}: target 1.5x)"
        vs_compile = r.speedup("compile")
        if vs_compile is not None:
            line += f", {_floor3(vs_compile)}x torch.compile ({'met' if vs_compile >= 1.0 else 'NOT met'}: target 1.0x)"
        out.append(line)
    return out


def forward_bandwidth_share(rows: list[Row], ceiling_gbps: float) -> list[str]:
    """The GPU target: each fused forward's achieved bandwidth as a share of the copy bandwidth (goal >= 75%)."""
    return [f"{r.op} {r.shape} forward: {r.fused_gbps:.1f} GB/s = {100 * r.fused_gbps / ceiling_gbps:.0f}% of copy "
            f"({'met' if r.fused_gbps >= 0.75 * ceiling_gbps else 'NOT met'}: goal 75%)"
            for r in rows if r.passes == "forward"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lessons_pkg.kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["issue", "course"],
                        help="which shape sets to time (default: issue course)")
    parser.add_argument("--quick", action="store_true", help="same as --shapes quick (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: every core)")
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=None,
                        help="alternating timed rounds (the best round of each implementation is shown)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for minutes)")
    parser.add_argument("--no-unfused", action="store_true", help="skip the step-by-step reference")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which other processes on a shared "
                             "machine do not inflate (use with --threads 1: it sums over threads)")
    parser.add_argument("--cold", action="store_true",
                        help="flush the caches (write 256 MB) before every timed call: each op reads its inputs "
                             "from memory (default: each implementation's own steady state, as in a training loop)")
    parser.add_argument("--output", help="also write the complete report (markdown) to this file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu measures one CPU thread: use it with --threads 1 on the CPU")
    shape_sets = ["quick"] if args.quick else args.shapes
    rounds = args.rounds or (5 if args.quick else 9)
    set_clock(args.clock)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    state = "cold caches (flushed before each call)" if args.cold else "steady state (~5 ms of untimed calls, then the mean of consecutive calls, ~10 ms per sample)"
    report = [f"machine: {machine_description(args.device)}; clock: {args.clock}; best of {rounds} alternating rounds, "
              f"{state}"]
    print(report[0], flush=True)
    ceiling = copy_bandwidth_gbps(device, mbytes=64 if args.quick else 256)
    peak = matmul_gflops(device, n=512 if args.quick else 1024)
    rows = []
    for name in shape_sets:
        rows += run(SHAPES[name], device=args.device, rounds=rounds, compile=not args.no_compile,
                    unfused=not args.no_unfused, cold=args.cold, log=lambda m: print(m, flush=True))
    report.append(format_table(rows, ceiling, peak))
    report.append("\ntargets (forward+backward):\n" + "\n".join(f"  {line}" for line in targets(rows)))
    if device.type == "cuda":
        report.append("\nGPU forward bandwidth:\n" + "\n".join(f"  {line}" for line in forward_bandwidth_share(rows, ceiling)))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    report.append(f"\nload average at the end: {load}")
    text = "\n".join(report)
    print("\n".join(report[1:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device), "copy_gbps": ceiling, "matmul_gflops": peak,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
