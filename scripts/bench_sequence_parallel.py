"""Activation memory and communication of one transformer layer, with and without sequence parallelism.

    python scripts/bench_sequence_parallel.py                 # TP 1, 2, 4; the table and a figure
    python scripts/bench_sequence_parallel.py --seq 1024 --plot outputs/ch6/sp_memory.png

For each tensor-parallel size t and each mode (tensor parallel only; tensor +
sequence parallel), t gloo ranks run one ``ParallelTransformerLayer`` forward
and backward on a micro-batch (dropout on, attention dropout included, as in
the paper's count) and measure, per rank:

* activation bytes kept for backward: the peak of
  :class:`lessons_pkg.pipeline.memory.SavedTensorMeter` (every tensor autograd
  saves, counted once per storage, parameters excluded);
* what the paper's formula predicts (Korthikanti et al. 2022, Table 2), with
  this course's element sizes: the paper counts 2-byte activations and 1-byte
  dropout masks, giving ``s b h (34 + 5 a s / h)`` per layer; here activations
  are float32 (4 bytes) and a dropout keeps its float32 noise (4 bytes), so the
  same terms give ``s b h (72 + 12 a s / h)``, of which ``s b h 24`` (the two
  LayerNorm inputs, the inputs of the QKV and first MLP matmuls, two dropout
  masks) is not split by tensor parallelism alone and is split by sequence
  parallelism;
* bytes each rank sends in the layer's collectives (ring algorithms), forward
  and backward, from :func:`lessons_pkg.tensor_parallel.instrument.count_collectives`.

Bytes, not timings: the numbers are the same on every run and machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lessons_pkg import parallel_state as ps  # noqa: E402
from lessons_pkg.pipeline.memory import SavedTensorMeter  # noqa: E402
from lessons_pkg.tensor_parallel import GPTConfig  # noqa: E402
from lessons_pkg.tensor_parallel.instrument import count_collectives  # noqa: E402
from lessons_pkg.tensor_parallel.random import model_parallel_manual_seed  # noqa: E402
from lessons_pkg.tensor_parallel.transformer import ParallelTransformerLayer  # noqa: E402
from lessons_pkg.testing import run_on_ranks  # noqa: E402

MIB = 2 ** 20


def predicted_parts(s: int, b: int, h: int, a: int, t: int, sp: bool) -> tuple[float, float]:
    """The paper's per-layer count with 4-byte activations and 4-byte masks (module docstring), in two parts:
    the ``24 s b h`` that tensor parallelism alone leaves whole, and the rest (split by t either way)."""
    unsplit, split = 24 * s * b * h, (48 + 12 * a * s / h) * s * b * h
    return (unsplit / t if sp else unsplit), split / t


def predicted_bytes(s: int, b: int, h: int, a: int, t: int, sp: bool) -> float:
    return sum(predicted_parts(s, b, h, a, t, sp))


def _measure(config: GPTConfig, b: int, s: int, sp: bool) -> dict:
    tp = torch.distributed.get_world_size()
    ps.initialize_model_parallel(tp)
    rank = ps.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    model_parallel_manual_seed(0, rank)
    layer = ParallelTransformerLayer(dataclasses.replace(config, sequence_parallel=sp and tp > 1))
    local = s // tp if sp and tp > 1 else s
    x = torch.randn(b, local, config.hidden_size, requires_grad=True)   # [b, s, h] or this rank's [b, s/t, h]
    group = ps.get_tensor_model_parallel_group()
    with SavedTensorMeter(exclude=layer.parameters()) as meter:   # x counts: the first LayerNorm keeps it
        with count_collectives(group) as forward:
            y = layer(x)
        with count_collectives(group) as backward:
            y.backward(torch.ones_like(y))
    return {"peak": meter.peak, "forward": forward.ring_bytes_sent(tp), "backward": backward.ring_bytes_sent(tp),
            "calls_forward": dict(forward), "calls_backward": dict(backward)}


def run(hidden: int, heads: int, seq: int, batch: int, sizes: list[int], dropout: float = 0.1) -> list[dict]:
    config = GPTConfig(vocab_size=128, hidden_size=hidden, num_layers=1, num_attention_heads=heads,
                       max_position_embeddings=seq, hidden_dropout=dropout, attention_dropout=dropout)
    rows = []
    for tp in sizes:
        for sp in ((False, True) if tp > 1 else (False,)):
            result = run_on_ranks(_measure, tp, args=(config, batch, seq, sp), timeout=300)[0]
            unsplit, split = predicted_parts(seq, batch, hidden, heads, tp, sp)
            rows.append({"tp": tp, "sp": sp, **result, "predicted": unsplit + split, "unsplit": unsplit})
    return rows


def table(rows: list[dict], hidden: int, heads: int, seq: int, batch: int) -> str:
    full = seq * batch * hidden * 4
    lines = [f"one layer: s={seq} b={batch} h={hidden} a={heads}, dropout 0.1, float32; "
             f"one [s, b, h] tensor = {full / MIB:.2f} MiB",
             f"{'layout':<14}{'activations/rank MiB':>22}{'formula MiB':>13}{'measured/formula':>18}"
             f"{'sent fwd MiB':>14}{'sent bwd MiB':>14}  collectives forward | backward"]
    for r in rows:
        name = f"TP={r['tp']}" + (" + SP" if r["sp"] else "")
        calls = ", ".join(f"{n} {k}" for k, n in sorted(r["calls_forward"].items())) or "-"
        back = ", ".join(f"{n} {k}" for k, n in sorted(r["calls_backward"].items())) or "-"
        lines.append(f"{name:<14}{r['peak'] / MIB:>22.2f}{r['predicted'] / MIB:>13.2f}"
                     f"{r['peak'] / r['predicted']:>18.3f}{r['forward'] / MIB:>14.2f}{r['backward'] / MIB:>14.2f}"
                     f"  {calls} | {back}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | None = None):
    """The figure of docs/benchmarks.md: measured bytes beside the formula's two parts. Saved to ``path`` if given."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [f"TP={r['tp']}" + ("\n+ SP" if r["sp"] else "") for r in rows]
    xs = list(range(len(rows)))
    ax.bar([x - 0.2 for x in xs], [r["peak"] / MIB for r in rows], 0.4, label="measured (tensors saved for backward)")
    unsplit = [r["unsplit"] / MIB for r in rows]
    rest = [(r["predicted"] - r["unsplit"]) / MIB for r in rows]
    ax.bar([x + 0.2 for x in xs], unsplit, 0.4, color="C1", edgecolor="black",
           label="formula: LayerNorm/matmul inputs, masks (24 sbh)")
    ax.bar([x + 0.2 for x in xs], rest, 0.4, bottom=unsplit, color="none", edgecolor="black", hatch="//",
           label="formula: the rest (split by TP alone)")
    ax.set_xticks(xs, names)
    ax.set_ylabel("MiB per rank, one layer")
    ax.set_title("Activation memory of one layer: tensor parallelism leaves 24 sbh whole,\n"
                 "sequence parallelism splits it too", fontsize=10)
    ax.legend(fontsize=8)
    plt.tight_layout()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120)
        print(f"figure written to {path}")
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--plot", default="outputs/ch6/sequence_parallel_memory.png")
    args = p.parse_args(argv)
    if args.seq < 2:
        p.error(f"--seq must be at least 2 tokens, got {args.seq}")
    for t in args.tp:
        if t < 1 or args.num_attention_heads % t or args.seq % t:
            p.error(f"--tp {t} must divide --num-attention-heads ({args.num_attention_heads}) and --seq ({args.seq})")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = run(args.hidden_size, args.num_attention_heads, args.seq, args.batch, args.tp)
    print(table(rows, args.hidden_size, args.num_attention_heads, args.seq, args.batch))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
