"""Context parallelism measured: activation memory per rank, work per rank, bytes sent, the ring's timeline.

    python scripts/bench_context_parallel.py                      # s=4096 on the course model's layer
    python scripts/bench_context_parallel.py --seq 2048 --plot outputs/ch6/cp

For CP = 1, 2, 4 (gloo ranks), one ``ParallelTransformerLayer`` of the course
model (h=256, a=8) takes a forward and a backward on a batch of one sequence of
``--seq`` tokens, each rank holding its ``s / cp``:

* activation bytes per rank kept for backward (``SavedTensorMeter``), beside
  the ``[b, a, s, s]`` float32 attention probabilities that step-by-step
  attention would keep at CP=1 (the memory wall of long sequences);
* ring attention's work per rank: chunk pairs computed and forward compute
  time, with Megatron's balanced split and with the plain contiguous one;
* bytes each rank sends for one layer's attention (forward and backward);
* with ``--plot``: the ring's timeline at CP=2 (compute and wait per step and
  rank, measured with ``time.perf_counter``, one clock for every process on
  the machine) and the work per rank.

Memory and bytes are the same on every machine; the times are this machine's
(2 cores here: at CP=4 four ranks share them, so the times show sharing, and
the pair counts are the balance).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lessons_pkg import parallel_state as ps  # noqa: E402
from lessons_pkg.context_parallel.ring_attention import RingTrace, tracing  # noqa: E402
from lessons_pkg.pipeline.memory import SavedTensorMeter  # noqa: E402
from lessons_pkg.tensor_parallel import GPTConfig  # noqa: E402
from lessons_pkg.tensor_parallel.transformer import ParallelTransformerLayer  # noqa: E402
from lessons_pkg.testing import run_on_ranks  # noqa: E402

MIB = 2 ** 20


def _measure(config: GPTConfig, batch: int, seq: int, layout: str) -> dict:
    cp = dist.get_world_size()
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    torch.manual_seed(0)
    layer = ParallelTransformerLayer(config, cp_group=ps.get_context_parallel_group())
    if layout != "balanced":   # the same layer, its attention on the contiguous split
        import functools

        from lessons_pkg.context_parallel.ring_attention import ring_attention
        attention = layer.self_attention
        attention.core_attention = lambda q, k, v: ring_attention(q, k, v, attention.cp_group, True, layout)[0]
        functools.update_wrapper(attention.core_attention, ring_attention)
    x = torch.randn(batch, seq // cp, config.hidden_size, requires_grad=True)   # this rank's tokens
    trace = RingTrace()
    dist.barrier()
    start = time.perf_counter()
    with SavedTensorMeter(exclude=layer.parameters()) as meter, tracing(trace):
        y = layer(x)
        y.backward(torch.ones_like(y))
    forward_compute = sum(t1 - t0 for p, k, _, t0, t1 in trace.events if p == "forward" and k == "compute")
    return {"peak": meter.peak, "pairs": trace.pairs, "bytes": trace.bytes_sent, "forward_compute_s": forward_compute,
            "events": [(p, k, s, t0 - start, t1 - start) for p, k, s, t0, t1 in trace.events]}


def run(seq: int, hidden: int = 256, heads: int = 8, batch: int = 1, sizes=(1, 2, 4)) -> list[dict]:
    config = GPTConfig(vocab_size=128, hidden_size=hidden, num_layers=1, num_attention_heads=heads,
                       max_position_embeddings=seq, hidden_dropout=0.0, attention_dropout=0.0)
    rows = []
    for cp in sizes:
        for layout in (("balanced",) if cp == 1 else ("balanced", "contiguous")):
            ranks = run_on_ranks(_measure, cp, args=(config, batch, seq, layout), timeout=600)
            rows.append({"cp": cp, "layout": layout, "ranks": ranks})
    return rows


def table(rows: list[dict], seq: int, hidden: int = 256, heads: int = 8, batch: int = 1, times: bool = True) -> str:
    """The measurements as text; ``times=False`` leaves out the compute times (which vary from run to run)."""
    probs = batch * heads * seq * seq * 4
    lines = [f"one layer, s={seq} b={batch} h={hidden} a={heads}, float32, no dropout; step-by-step attention at "
             f"CP=1 would keep [b, a, s, s] probabilities of {probs / MIB:.0f} MiB",
             f"{'CP':>3} {'split':<11}{'activations/rank MiB':>22}{'x CP=1':>8}{'chunk pairs per rank':>26}"
             + (f"{'fwd compute ms per rank':>30}" if times else "") + f"{'sent/rank MiB':>15}"]
    base = rows[0]["ranks"][0]["peak"]
    for r in rows:
        peaks = [x["peak"] for x in r["ranks"]]
        pairs = " ".join(str(x["pairs"]) for x in r["ranks"]) if r["cp"] > 1 else "-"
        ms = " ".join(f"{1000 * x['forward_compute_s']:.0f}" for x in r["ranks"]) if r["cp"] > 1 else "-"
        sent = max(x["bytes"] for x in r["ranks"]) / MIB
        lines.append(f"{r['cp']:>3} {r['layout']:<11}{max(peaks) / MIB:>22.2f}{max(peaks) / base:>8.3f}"
                     f"{pairs:>26}" + (f"{ms:>30}" if times else "") + f"{sent:>15.2f}")
    return "\n".join(lines)


def plot_timeline(row: dict, path: str | None = None):
    """Each rank's compute and wait per ring step, forward then backward."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.6 * len(row["ranks"])))
    colors = {("forward", "compute"): "C0", ("backward", "compute"): "C1", ("forward", "wait"): "0.75",
              ("backward", "wait"): "0.55"}
    for rank, r in enumerate(row["ranks"]):
        for p, k, step, t0, t1 in r["events"]:
            ax.barh(rank, 1000 * (t1 - t0), left=1000 * t0, color=colors[p, k], edgecolor="black", linewidth=0.4)
            if k == "compute" and t1 - t0 > 0.02 * max(e[4] for e in r["events"]):
                ax.text(1000 * (t0 + t1) / 2, rank, f"kv{(rank - step) % row['cp'] if p == 'forward' else (rank + step) % row['cp']}",
                        ha="center", va="center", fontsize=7, color="white")
    handles = [Patch(facecolor=c, edgecolor="black", label=f"attention {p}: {k}") for (p, k), c in colors.items()]
    ax.set_yticks(range(len(row["ranks"])), [f"rank {r}" for r in range(len(row["ranks"]))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the start of one layer's forward (gaps: QKV, MLP, LayerNorms; then its backward)")
    ax.set_title(f"Ring attention at CP={row['cp']} ({row['layout']} split): kvR = the keys and values of rank R",
                 fontsize=9)
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    plt.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        print(f"figure written to {path}")
    return fig


def plot_work(rows: list[dict], path: str | None = None):
    """Chunk pairs per rank, balanced against contiguous, for every CP > 1."""
    import matplotlib.pyplot as plt

    multi = [r for r in rows if r["cp"] > 1]
    fig, axes = plt.subplots(1, len({r["cp"] for r in multi}), figsize=(8, 2.6), squeeze=False)
    for ax, cp in zip(axes[0], sorted({r["cp"] for r in multi})):
        for offset, layout in ((-0.2, "balanced"), (0.2, "contiguous")):
            r = next(x for x in multi if x["cp"] == cp and x["layout"] == layout)
            ax.bar([i + offset for i in range(cp)], [x["pairs"] for x in r["ranks"]], 0.4, label=layout)
        ax.set_title(f"CP={cp}", fontsize=9)
        ax.set_xticks(range(cp), [f"rank {i}" for i in range(cp)], fontsize=8)
        ax.set_ylabel("chunk pairs of causal attention", fontsize=8)
    axes[0][0].legend(fontsize=8)
    plt.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
        print(f"figure written to {path}")
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--plot", default=None, help="folder for context_parallel_timeline.png and _work.png")
    args = p.parse_args(argv)
    if args.seq < 2:
        p.error(f"--seq must be at least 2 tokens, got {args.seq}")
    if 1 not in args.cp:
        p.error("--cp must include 1 (the baseline)")
    for cp in args.cp:
        if cp < 1 or args.seq % (2 * cp):
            p.error(f"--seq {args.seq} must be divisible by 2 x {cp}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = run(args.seq, args.hidden_size, args.num_attention_heads, sizes=sorted(args.cp))
    print(table(rows, args.seq, args.hidden_size, args.num_attention_heads))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        os.makedirs(args.plot, exist_ok=True)
        two = next((r for r in rows if r["cp"] == 2 and r["layout"] == "balanced"), None)
        if two is not None:
            plot_timeline(two, os.path.join(args.plot, "context_parallel_timeline.png"))
        plot_work(rows, os.path.join(args.plot, "context_parallel_work.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
