"""Write the results file of scripts/gpu_check.sh from its step logs.

    python scripts/gpu_check_summary.py LOG_DIR RESULTS_FILE [--seconds N]

LOG_DIR holds, per step, ``<step>.status`` (one line: ``name status seconds [reason]``) and
``<step>.log``. The results file (markdown) has one table of the steps (ok / failed /
timeout / skipped, with the reason and duration), then what each step measured, parsed
from its log: the kernel tests' pytest summary, each forward kernel's share of the copy
bandwidth (goal >= 75%), the training run's tokens/s and MFU (goal >= 40% on H100/H200),
and the end of the generation benchmark's output. Exit status: 1 if a step failed or timed
out, else 0 (skipped steps are not failures: a machine without a GPU skips them).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

STEPS = ("environment", "kernel_build", "kernel_tests", "kernel_bench", "training", "generation")
FORWARD_GOAL = 0.75
MFU_GOAL = 40.0


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def parse_status(line: str) -> dict:
    """``name status seconds [reason...]`` -> dict; a missing or garbled line is status 'missing'."""
    parts = line.strip().split(" ", 3)
    if len(parts) < 3 or not parts[2].isdigit():
        return {"status": "missing", "seconds": None, "reason": "no status line (the step never ran)"}
    return {"status": parts[1], "seconds": int(parts[2]), "reason": parts[3] if len(parts) > 3 else ""}


def parse_pytest(log: str) -> str | None:
    """The pytest summary (``3 passed, 12 skipped in 4.1s``) or None."""
    found = re.findall(r"^=*\s*((?:\d+ (?:passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)"
                       r"(?:, )?)+ in [\d.]+s)", log, flags=re.M)
    return found[-1] if found else None


def parse_bandwidth(log: str) -> tuple[float | None, list[dict]]:
    """Copy bandwidth and, per forward kernel, its GB/s and share of it (from bench's 'GPU forward bandwidth')."""
    copy = re.search(r"measured copy bandwidth \(y\.copy_\(x\), read \+ write\): ([\d.]+) GB/s", log)
    copy_gbps = float(copy.group(1)) if copy else None
    rows = []
    for m in re.finditer(r"^\s+(\S+ \S+) forward: ([\d.]+) GB/s = (\d+)% of copy", log, flags=re.M):
        gbps = float(m.group(2))
        # the share from the unrounded numbers (the printed percent is rounded: 74.6% prints as 75%)
        percent = 100 * gbps / copy_gbps if copy_gbps else float(m.group(3))
        rows.append({"kernel": m.group(1), "gbps": gbps, "percent": percent})
    return copy_gbps, rows


def parse_training(log: str) -> list[dict]:
    """Every Megatron-style progress line: iteration, ms/iteration, tokens/s, TFLOP/s, MFU (None if absent)."""
    out = []
    for line in log.splitlines():
        it = re.search(r"iteration\s+(\d+)/\s*(\d+)", line)
        tps = re.search(r"tokens per second: ([\d.]+)", line)
        if not (it and tps):
            continue
        ms = re.search(r"elapsed time per iteration \(ms\): ([\d.]+)", line)
        tflops = re.search(r"TFLOP/s per device: ([\d.]+)", line)
        mfu = re.search(r"MFU: ([\d.]+)%", line)
        nan = re.search(r"number of nan iterations:\s*(\d+)", line)
        out.append({"iteration": int(it.group(1)), "ms": float(ms.group(1)) if ms else None,
                    "tokens_per_s": float(tps.group(1)), "tflops": float(tflops.group(1)) if tflops else None,
                    "mfu": float(mfu.group(1)) if mfu else None, "nan_iterations": int(nan.group(1)) if nan else 0})
    return out


def gpu_name(env_log: str) -> str | None:
    m = re.search(r"^gpu (.+?) \|", env_log, flags=re.M)
    return m.group(1) if m else None


def tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def summarize(log_dir: str, seconds: int | None = None) -> tuple[str, bool]:
    """The results file's text and whether every step that ran succeeded."""
    statuses = {s: parse_status(read(os.path.join(log_dir, f"{s}.status"))) for s in STEPS}
    logs = {s: read(os.path.join(log_dir, f"{s}.log")) for s in STEPS}
    name = gpu_name(logs["environment"])
    lines = ["# GPU check", "", f"GPU: {name or 'none (no CUDA device)'}"]
    env = [ln for ln in logs["environment"].splitlines() if ln.startswith(("python ", "load_average"))]
    lines += [f"  {ln}" for ln in env]
    if seconds is not None:
        lines.append(f"total time: {seconds} s")
    lines += ["", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for s in STEPS:
        st = statuses[s]
        lines.append(f"| {s} | {st['status']} | {'' if st['seconds'] is None else st['seconds']} | {st['reason']} |")
    # not passed: failed, timed out, never ran, or skipped for lack of time (a missing GPU is a skip, not a failure)
    failed = [s for s in STEPS if statuses[s]["status"].startswith(("failed", "timeout", "missing"))
              or "budget" in statuses[s]["reason"]]

    if statuses["kernel_tests"]["status"] != "skipped":
        lines += ["", "## CUDA kernel tests", f"pytest: {parse_pytest(logs['kernel_tests']) or 'no summary line found'}"]
    if statuses["kernel_bench"]["status"] != "skipped":
        copy, rows = parse_bandwidth(logs["kernel_bench"])
        lines += ["", "## Kernel benchmark (forward goal: >= 75% of the copy bandwidth)",
                  f"copy bandwidth: {copy if copy is not None else 'not found'} GB/s"]
        bench_ok = statuses["kernel_bench"]["status"] == "ok"
        if not bench_ok:
            lines.append(f"(the benchmark did not finish: {statuses['kernel_bench']['status']}; no verdicts)")
        for r in rows:
            verdict = ("met" if r["percent"] >= 100 * FORWARD_GOAL else "NOT met") if bench_ok else "no verdict"
            lines.append(f"- {r['kernel']}: {r['gbps']:.1f} GB/s, {r['percent']:.0f}% ({verdict})")
        if rows and bench_ok:
            met = sum(r["percent"] >= 100 * FORWARD_GOAL for r in rows)
            lines.append(f"forward kernels at >= 75% of copy: {met} of {len(rows)}")
        table = read(os.path.join(log_dir, "kernel_bench.md"))
        if table:
            lines += ["", "```", table.rstrip(), "```"]
    if statuses["training"]["status"] != "skipped":
        progress = parse_training(logs["training"])
        lines += ["", "## GPT-2 124M, bf16, TP=1 (MFU goal: >= 40% on H100/H200)"]
        if progress:
            lines += ["| iterations up to | ms / iteration | tokens/s | TFLOP/s | MFU |", "|---:|---:|---:|---:|---:|"]
            for p in progress:
                mfu = "-" if p["mfu"] is None else f"{p['mfu']:.1f}%"
                lines.append(f"| {p['iteration']} | {p['ms']} | {p['tokens_per_s']:.0f} | {p['tflops']} | {mfu} |")
            last = progress[-1]
            nan_iterations = sum(p["nan_iterations"] for p in progress)
            if statuses["training"]["status"] != "ok" or nan_iterations:
                lines.append(f"no verdict: the run's status is {statuses['training']['status']}, "
                             f"{nan_iterations} NaN iteration(s)")
            elif last["mfu"] is not None:
                verdict = "met" if last["mfu"] >= MFU_GOAL else "NOT met"
                lines.append(f"last interval: {last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.1f}% ({verdict})")
            else:
                lines.append(f"last interval: {last['tokens_per_s']:.0f} tokens/s (MFU not computed: peak TFLOP/s of "
                             f"this GPU unknown; set GPU_CHECK_PEAK_TFLOPS)")
        else:
            lines += ["no progress line found; end of the log:", "```", tail(logs["training"], 30), "```"]
    if statuses["generation"]["status"] != "skipped":
        lines += ["", "## Generation benchmark (end of its output)", "```", tail(logs["generation"], 25), "```"]
    for s in failed:
        lines += ["", f"## {s}: {statuses[s]['status']} (end of its log)", "```", tail(logs[s], 30), "```"]
    return "\n".join(lines) + "\n", not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir")
    parser.add_argument("results")
    parser.add_argument("--seconds", type=int, default=None, help="total time of the check")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.log_dir):
        parser.error(f"log folder {args.log_dir!r} does not exist (the logs of scripts/gpu_check.sh)")
    text, ok = summarize(args.log_dir, args.seconds)
    with open(args.results, "w") as f:
        f.write(text)
    print(text)
    print(f"results written to {args.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
