"""Our trainer against the training loop a user would write with ``transformers``, on the CPU.

    python scripts/bench_trainer.py                      # 3 alternating rounds, every variant (~10 min on 2 cores)
    python scripts/bench_trainer.py --rounds 1 --iters 6 --output outputs/bench_trainer.md
    python scripts/bench_trainer.py --threads 1 --clock cpu  # on a shared machine: CPU time of one thread

One configuration for everyone: GPT, 4 layers, hidden 256, 8 heads, sequence 256,
micro-batch 8 (one micro-batch per iteration), vocabulary 2048, random tokens,
dropout 0.1, AdamW (lr 1e-4, weight decay 0.01), gradient clipping at 1.0, float32.

Variants, each in its own process (this script starts them; one process tree):

    ours            src/ch6/pretrain_gpt.py, TP=1, 2 threads
    ours-fused      the same with --use-fused-kernels
    hf-eager        GPT2LMHeadModel (attn_implementation="eager"): forward, loss.backward(),
                    clip_grad_norm_, AdamW.step(), zero_grad(): the ten-line loop, 2 threads
    hf-sdpa         the same with attn_implementation="sdpa"
    ours-tp2        pretrain_gpt.py with TP=2: 2 processes of 1 thread each

Each run trains ``--iters`` iterations; the first ``--warmup`` are dropped and the
median time of the others gives tokens/s. Rounds alternate the variants (ours, hf,
ours, hf, ...) so a burst of load from other jobs hits all of them alike; each variant
reports its best round. For our runs the time of every collective (all-reduce,
all-gather, broadcast, ...) inside the timed iterations is measured too (a wrapper
around ``torch.distributed``), which gives the share of time in communication.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, micro_batch_size=8,
              vocab_size=2048, lr=1e-4, weight_decay=0.01, clip_grad=1.0, dropout=0.1)
VARIANTS = ("ours", "ours-fused", "hf-eager", "hf-sdpa", "ours-tp2")
CLOCK_VAR = "BENCH_TRAINER_CLOCK"  # "wall" or "cpu", read by the workers
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "barrier", "send", "recv", "isend", "irecv")


# --- the workers (run in child processes) ----------------------------------------------------------
def step_clock():
    """The clock of a one-process worker: elapsed time, or this process's CPU time (``--clock cpu``, 1 thread)."""
    return time.process_time if os.environ.get(CLOCK_VAR) == "cpu" else time.perf_counter


def worker_ours(iters: int, fused: bool, result_file: str) -> None:
    """Run pretrain_gpt.py in this process (one rank of a torchrun job), timing each iteration and its collectives."""
    import torch.distributed as dist

    from lessons_pkg.training import train as train_module

    clock = step_clock()  # the step's clock, also for the time in collectives
    comm = [0.0]
    in_step = [False]

    def timed(fn):
        def wrapper(*args, **kwargs):
            if not in_step[0]:
                return fn(*args, **kwargs)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                comm[0] += clock() - start
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, timed(getattr(dist, name)))

    steps = []
    original = train_module.train_step

    def train_step(*args, **kwargs):
        comm[0] = 0.0
        in_step[0] = True
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            in_step[0] = False
            steps.append((clock() - start, comm[0]))

    train_module.train_step = train_step
    sys.path.insert(0, os.path.join(ROOT, "src", "ch6"))
    import pretrain_gpt

    c = CONFIG
    argv = ["--tensor-model-parallel-size", os.environ.get("WORLD_SIZE", "1"),
            "--num-layers", c["num_layers"], "--hidden-size", c["hidden_size"],
            "--num-attention-heads", c["num_attention_heads"], "--seq-length", c["seq_length"],
            "--max-position-embeddings", c["seq_length"], "--micro-batch-size", c["micro_batch_size"],
            "--global-batch-size", c["micro_batch_size"], "--train-iters", iters, "--lr", c["lr"],
            "--weight-decay", c["weight_decay"], "--clip-grad", c["clip_grad"],
            "--hidden-dropout", c["dropout"], "--attention-dropout", c["dropout"],
            "--mock-data", "--vocab-size", c["vocab_size"], "--log-interval", iters, "--eval-iters", "0"]
    if fused:
        argv.append("--use-fused-kernels")
    rc = pretrain_gpt.main([str(a) for a in argv])
    if rc:
        raise SystemExit(rc)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_file, "w") as f:
            json.dump({"steps": steps}, f)


def worker_hf(iters: int, attn: str, result_file: str) -> None:
    """The plain loop a ``transformers`` user writes, same model size, data and optimizer settings."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    c = CONFIG
    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=c["vocab_size"], n_positions=c["seq_length"], n_embd=c["hidden_size"],
                        n_layer=c["num_layers"], n_head=c["num_attention_heads"], resid_pdrop=c["dropout"],
                        embd_pdrop=c["dropout"], attn_pdrop=c["dropout"], bos_token_id=None, eos_token_id=None,
                        attn_implementation=attn)
    model = GPT2LMHeadModel(config)
    if model.config._attn_implementation != attn:
        raise RuntimeError(f"asked for attn_implementation={attn!r}, the model uses {model.config._attn_implementation!r}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    g = torch.Generator().manual_seed(0)
    steps = []
    clock = step_clock()
    for _ in range(iters):
        tokens = torch.randint(0, c["vocab_size"], (c["micro_batch_size"], c["seq_length"]), generator=g)
        start = clock()
        loss = model(input_ids=tokens, labels=tokens).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append((clock() - start, 0.0))
    with open(result_file, "w") as f:
        json.dump({"steps": steps}, f)


# --- the driver ------------------------------------------------------------------------------------
def run_variant(variant: str, iters: int, threads: int, timeout: float, clock: str = "wall") -> dict:
    """Start one variant in a child process tree; return its per-step (seconds, communication seconds)."""
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        result = os.path.join(tmp, "result.json")
        # the CPU clock measures one process: the two-process TP=2 run is always timed by the wall clock
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{CLOCK_VAR: "wall" if variant == "ours-tp2" else clock})
        me = os.path.abspath(__file__)
        if variant == "ours-tp2":
            env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, "-m", "lessons_pkg.launch", "--nproc", "2", "--timeout", str(timeout), me,
                   "--worker", variant, "--iters", str(iters), "--result", result]
        else:
            from lessons_pkg.launch import free_port

            env.update(OMP_NUM_THREADS=str(threads), MASTER_PORT=str(free_port()))
            cmd = [sys.executable, me, "--worker", variant, "--iters", str(iters), "--result", result]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
        if proc.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(f"{variant} failed (exit code {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)


def summarize(steps: list, warmup: int, tokens_per_step: int) -> dict:
    """Median step time after ``warmup`` steps -> tokens/s, and the share of that time spent in collectives."""
    timed = steps[warmup:]
    if not timed:
        raise ValueError(f"no timed iterations: {len(steps)} run, {warmup} dropped as warm-up")
    seconds = statistics.median(s for s, _ in timed)
    comm = statistics.median(c for _, c in timed)
    return {"step_s": seconds, "tokens_per_s": tokens_per_step / seconds, "comm_share": comm / seconds if seconds else 0.0}


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def format_report(best: dict, rounds: int, iters: int, warmup: int, loads: list[str], clock: str = "wall",
                  threads: int = 2, every_round: dict | None = None) -> str:
    """The table of each variant's best round; with ``every_round`` (variant -> its rounds' summaries),
    also each variant's median round (less flattering, steadier: the best of a few rounds is a lucky draw)."""
    import platform

    import torch

    c = CONFIG
    lines = [f"trainer benchmark: {c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
             f"sequence {c['seq_length']}, micro-batch {c['micro_batch_size']}, vocabulary {c['vocab_size']}, "
             f"AdamW, clip {c['clip_grad']}, dropout {c['dropout']}, float32",
             f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
             f"{rounds} alternating rounds of {iters} iterations (first {warmup} dropped), best round per variant; "
             f"clock: {clock}" + (" (CPU time of the one-process variants; ours-tp2 by the wall clock)" if clock == "cpu" else ""),
             f"load average at the start of each round: {' | '.join(loads)}", "",
             "| variant | processes x threads | ms / iteration | tokens/s | vs hf-eager | vs hf-sdpa | time in collectives |",
             "|---|---|---:|---:|---:|---:|---:|"]
    layout = {"ours-tp2": "2 x 1"}
    for v, r in best.items():
        # with --clock cpu, ours-tp2 (wall clock, two processes) is not comparable with CPU-time variants
        comparable = not (clock == "cpu" and v == "ours-tp2")
        vs = [f"{r['tokens_per_s'] / best[h]['tokens_per_s']:.2f}x" if h in best and comparable else "-"
              for h in ("hf-eager", "hf-sdpa")]
        comm = f"{100 * r['comm_share']:.1f}%" if v.startswith("ours") else "-"
        lines.append(f"| {v} | {layout.get(v, f'1 x {threads}')} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{vs[0]} | {vs[1]} | {comm} |")
    if every_round and rounds > 1:
        medians = {v: statistics.median(r["tokens_per_s"] for r in runs) for v, runs in every_round.items()}
        lines += ["", "median round (tokens/s): " + ", ".join(
            f"{v} {m:.0f}" + "".join(f" ({m / medians[h]:.2f}x {h})" for h in ("hf-eager", "hf-sdpa")
                                     if h in medians and v.startswith("ours")
                                     and not (clock == "cpu" and v == "ours-tp2"))
            for v, m in medians.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=12, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="first iterations of each run not timed")
    parser.add_argument("--threads", type=int, default=2, help="threads of the one-process variants")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: time the one-process variants by their CPU time (needs --threads 1), which "
                             "other jobs on a shared machine do not inflate")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        if args.worker.startswith("ours"):
            worker_ours(args.iters, args.worker == "ours-fused", args.result)
        else:
            worker_hf(args.iters, args.worker.split("-")[1], args.result)
        return 0
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")
    if args.iters <= args.warmup:
        parser.error(f"--iters ({args.iters}) must exceed --warmup ({args.warmup})")

    tokens = CONFIG["micro_batch_size"] * CONFIG["seq_length"]
    best, loads, every_round = {}, [], {}
    for r in range(args.rounds):
        loads.append(load_average())
        for v in args.variants:
            res = summarize(run_variant(v, args.iters, args.threads, args.timeout, args.clock)["steps"], args.warmup, tokens)
            print(f"round {r + 1}: {v}: {res['tokens_per_s']:.0f} tokens/s, {100 * res['comm_share']:.1f}% in collectives "
                  f"(load {load_average()})", flush=True)
            every_round.setdefault(v, []).append(res)
            if v not in best or res["tokens_per_s"] > best[v]["tokens_per_s"]:
                best[v] = res
    report = (format_report(best, args.rounds, args.iters, args.warmup, loads, args.clock, args.threads, every_round)
              + f"\nload average at the end: {load_average()}")
    print(report)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
