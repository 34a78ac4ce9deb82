"""Where the GPU's time went in a ``torch.profiler`` trace: each kernel charged to the op that launched it.

    python scripts/trace_breakdown.py TRACE.json[.gz] --iterations 2

``TRACE`` is a Chrome-format trace, for example what ``pretrain_gpt.py --profile
--profile-trace TRACE.json`` writes. Every GPU kernel, copy and memset carries the
``External id`` of the CPU op that launched it (``aten::mm``, ``aten::copy_``, ...);
the ops around that op on the same thread (``aten::to``, ``MmBackward0``, the autograd
engine's ``evaluate_function: ...``) say what it was for. The script prints:

* one line per group of the table below: GPU time per iteration and its share;
* the ``--top`` launch sites (the launching op and its ``--depth - 1`` enclosing
  ops) by GPU time per iteration, with the kernel count and median duration;
* the GPU's busy time against the span from its first to its last kernel (the rest
  of the span is the GPU waiting for the host).

A group is the first rule whose word appears in the launch site (lower case). The rules
are for a GPT training step; a kernel that matches none is ``other``.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
import sys
from collections import defaultdict

# (group, words): the first group with a word in the launch site takes the kernel
GROUPS = [
    ("loss (log-softmax, NLL, vocabulary cut)", ("log_softmax", "logsoftmax", "nll", "cross_entropy",
                                                   "slice_backward", "masked_fill")),
    ("attention (SDPA, or softmax over the scores)", ("attention", "_softmax", "scaled_masked", "upper_triang")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("optimizer (AdamW)", ("adam", "_foreach_mul", "_foreach_add", "_foreach_lerp", "_foreach_sqrt",
                           "_foreach_div")),
    ("gradient norm", ("_foreach_norm", "aten::pow", "linalg_vector_norm")),
    ("LayerNorm", ("layer_norm",)),
    ("GeLU", ("gelu",)),
    ("dtype casts and copies", ("aten::to ", "_to_copy", "copy_", "clone", "memcpy")),
    ("adds, bias gradients, zero-fills", ("aten::add", "aten::sum", "fill_", "zero_", "stack", "cat")),
]
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    if not any(e.get("cat") in DEVICE_CATEGORIES for e in events):
        raise ValueError(f"{path}: no GPU kernels in this trace (was it recorded on a GPU, with CUDA activity?)")
    return events


def launch_sites(events: list[dict], depth: int) -> list[tuple[str, float]]:
    """``(launch site, duration in us)`` for every device event; the site is ``outer > ... > launching op``."""
    ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e]
    by_id = {e["args"]["External id"]: e for e in ops if "External id" in e.get("args", {})}
    by_thread = defaultdict(list)
    for e in ops:
        by_thread[e["tid"]].append(e)
    starts = {}
    for tid, lst in by_thread.items():
        lst.sort(key=lambda e: (e["ts"], -e["dur"]))
        starts[tid] = [e["ts"] for e in lst]
    out = []
    for k in events:
        if k.get("cat") not in DEVICE_CATEGORIES:
            continue
        op = by_id.get(k.get("args", {}).get("External id"))
        if op is None:
            out.append((k["name"][:60], k["dur"]))
            continue
        lst = by_thread[op["tid"]]
        # enclosing ops: start at or before op's start, end at or after its end (same thread)
        end = bisect.bisect_right(starts[op["tid"]], op["ts"])
        chain = [e["name"] for e in lst[:end] if e["ts"] + e["dur"] >= op["ts"] + op["dur"] and e is not op]
        chain = (chain + [op["name"]])[-depth:]
        out.append((" > ".join(name[:48] for name in chain), k["dur"]))
    return out


def group_of(site: str) -> str:
    low = site.lower()
    for name, words in GROUPS:
        if any(w in low for w in words):
            return name
    return "other"


def busy_and_span(events: list[dict]) -> tuple[float, float]:
    """The GPU's busy time (the union of its kernels' intervals) and the span from first start to last end, in us."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in DEVICE_CATEGORIES)
    if not kernels:
        raise ValueError("no GPU kernels in these events")
    busy, cur_start, cur_end = 0.0, None, None
    for s, e in kernels:  # union of intervals: overlapping kernels (several streams) count once
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    busy += cur_end - cur_start
    return busy, kernels[-1][1] - kernels[0][0]


def report(events: list[dict], iterations: int, depth: int, top: int) -> str:
    sites = launch_sites(events, depth)
    total = sum(d for _, d in sites)
    per_group, per_site = defaultdict(float), defaultdict(list)
    for site, d in sites:
        per_group[group_of(site)] += d
        per_site[site].append(d)
    busy, span = busy_and_span(events)
    ms = 1e-3 / iterations
    share = 100 * busy / span if span else 100.0
    lines = [f"GPU busy {busy * ms:.2f} ms per iteration over a span of {span * ms:.2f} ms "
             f"({share:.0f}% busy); kernel time summed: {total * ms:.2f} ms; "
             f"{len(sites) / iterations:g} kernels, copies and fills per iteration", "",
             "| group | ms / iteration | share |", "|---|---:|---:|"]
    for name, d in sorted(per_group.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {d * ms:.2f} | {100 * d / total:.1f}% |")
    lines += ["", f"top {top} launch sites:", "| ms / iteration | kernels / iteration | median us | site |",
              "|---:|---:|---:|---|"]
    for site, ds in sorted(per_site.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"| {sum(ds) * ms:.2f} | {len(ds) / iterations:g} | {statistics.median(ds):.1f} | {site} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a torch.profiler Chrome trace (.json or .json.gz)")
    p.add_argument("--iterations", type=int, required=True,
                   help="iterations the trace holds (times are divided by it): the trainer's --profile-step-end "
                        "minus --profile-step-start")
    p.add_argument("--depth", type=int, default=3, help="ops named per launch site (the launching op and outer ones)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    for name in ("iterations", "depth", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        events = load(args.trace)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        print(f"trace_breakdown: {error}", file=sys.stderr)
        return 2
    print(report(events, args.iterations, args.depth, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
