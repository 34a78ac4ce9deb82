"""Peak memory and time of checkpoint_util.py on a GPT-2 345M-size checkpoint (random weights, built here).

    python scripts/bench_checkpoint.py [--workdir /tmp/ckpt-bench] [--keep]

1. builds GPT-2 345M's master weights (24 layers, hidden 1024, 16 heads, 1024
   positions, 50257 tokens) from a seed and writes them as a TP=2 x PP=2
   Megatron checkpoint (weights only, float32: what the lesson converts);
2. runs ``src/ch6/checkpoint_util.py`` as a child process for the lesson's three
   conversions (TP2xPP2 -> TP1, -> TP2, -> PP4) and the reverse split
   (TP1 -> TP2xPP2), and reports each one's wall time, peak RSS (the child's
   ``ru_maxrss``) and the sizes of the files it wrote, next to the lesson's
   ``tree -h`` sizes (1.3G; 680M x 2; 489M 288M 288M 485M).

The model is 1.42 GB in float32, so "one target shard plus one layer" is about
1.5 GB for the merge to TP=1 and about 0.4 GB for the TP2xPP2 split; a tool that
holds every source shard and the target at once needs twice the model or more.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_tool(*args: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one checkpoint_util.py run, in a fresh parent so the peak is its own."""
    tool = os.path.join(ROOT, "src/ch6/checkpoint_util.py")
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            f"subprocess.run([sys.executable, {tool!r}, '--no-progress', *{list(args)!r}], check=True, "
            "stdout=subprocess.DEVNULL); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, peak = map(float, out.split())
    return seconds, peak


def sizes(root: str) -> list[tuple[str, float]]:
    out = []
    for dirpath, _, names in sorted(os.walk(root)):
        for n in sorted(names):
            if n.endswith(".pt"):
                p = os.path.join(dirpath, n)
                out.append((os.path.relpath(p, root), os.path.getsize(p) / 2**20))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/ckpt-bench")
    p.add_argument("--keep", action="store_true")
    ns = p.parse_args()
    import torch

    from lessons_pkg.checkpoint.convert import InMemorySource, megatron_args_for, write_megatron
    from lessons_pkg.checkpoint.reshard import Layout
    from lessons_pkg.tensor_parallel import GPTConfig, master_state_dict

    shutil.rmtree(ns.workdir, ignore_errors=True)
    os.makedirs(ns.workdir)
    config = GPTConfig(vocab_size=50257, hidden_size=1024, num_layers=24, num_attention_heads=16,
                       max_position_embeddings=1024)
    start = time.perf_counter()
    master = master_state_dict(config, seed=1234)
    n = sum(t.numel() for t in master.values())
    src = os.path.join(ns.workdir, "345m-tp2pp2")
    write_megatron(InMemorySource(config, master, megatron_args_for(config)), src, Layout(2, 2), with_optim=False,
                   log=lambda *a: None, progress=False)
    del master
    print(f"# checkpoint_util.py on a GPT-2 345M-size checkpoint ({n:,} parameters, float32, random weights)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"built the TP2xPP2 source in {time.perf_counter() - start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f}")
    print()
    print("| conversion | wall time (s) | peak RSS (GiB) | files written (MiB) |")
    print("|---|---|---|---|")
    runs = [("TP2xPP2 -> TP1xPP1", src, "tp1", 1, 1), ("TP2xPP2 -> TP2xPP1", src, "tp2", 2, 1),
            ("TP2xPP2 -> TP1xPP4", src, "pp4", 1, 4)]
    for label, load, name, tp, pp in runs:
        out = os.path.join(ns.workdir, name)
        seconds, peak = run_tool("--load-dir", load, "--save-dir", out, "--target-tensor-parallel-size", str(tp),
                                 "--target-pipeline-parallel-size", str(pp))
        files = ", ".join(f"{s:.1f}" for _, s in sizes(out))
        print(f"| {label} | {seconds:.1f} | {peak:.2f} | {files} |", flush=True)
    out = os.path.join(ns.workdir, "back-tp2pp2")
    seconds, peak = run_tool("--load-dir", os.path.join(ns.workdir, "tp1"), "--save-dir", out,
                             "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
    print(f"| TP1xPP1 -> TP2xPP2 | {seconds:.1f} | {peak:.2f} | {', '.join(f'{s:.1f}' for _, s in sizes(out))} |")
    print()
    print("lesson (Megatron-LM, `tree -h`): TP1 1.3G; TP2 680M + 680M; PP4 489M, 288M, 288M, 485M")
    if not ns.keep:
        shutil.rmtree(ns.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
