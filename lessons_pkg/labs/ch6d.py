"""Chapter 6d (training with Megatron): parameters per rank, bytes per parameter, a 3D layout that reproduces one process."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from lessons_pkg.labs import Exercise, Fail
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT
from lessons_pkg.tensor_parallel.layers import TPShape

SCRIPT = Path(__file__).resolve().parents[2] / "src" / "ch6" / "pretrain_gpt.py"


def _count(config: GPTConfig, tp: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no process group
        return sum(p.numel() for p in ParallelGPT(config, TPShape(tp, 0)).parameters())


def check_params(module) -> list[str]:
    lines = []
    cases = [(2, 32, 4, 300, 16, 1), (2, 32, 4, 300, 16, 2), (3, 48, 6, 1000, 64, 3),
             (12, 768, 12, 50257, 1024, 1), (24, 1024, 16, 50257, 1024, 4)]
    for layers, hidden, heads, vocab, seq, tp in cases:
        config = GPTConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                           max_position_embeddings=seq)
        want = _count(config, tp)
        got = module.params_per_rank(layers, hidden, vocab, seq, tp)
        if got != want:
            raise Fail(f"{layers} layers, hidden {hidden}, vocab {vocab}, seq {seq}, TP={tp}: you say {got:,}; "
                       f"the model built on one tensor rank holds {want:,} ({got - want:+,})")
        lines.append(f"{layers} layers, hidden {hidden}, vocab {vocab}, TP={tp}: {want:,} parameters per rank")
    return lines


def check_bytes(module) -> list[str]:
    want = {"fp16 weight": 2, "fp32 gradient": 4, "fp32 master weight": 4, "adam m": 4, "adam v": 4}
    got = dict(module.BYTES)
    if got.keys() != want.keys():
        raise Fail(f"BYTES must have exactly the keys {sorted(want)}")
    wrong = {k: v for k, v in got.items() if v != want[k]}
    if wrong:
        raise Fail(f"not right: {wrong} (mixed precision: fp16 copies for the matmuls, fp32 for everything "
                   "the optimizer adds up; Megatron accumulates gradients in fp32)")
    n = 89_714_688
    for dp in (1, 2, 4, 8):
        for zero1 in (False, True):
            expected = n * (sum(want.values()) if not zero1 else 2 + 4 + 12 / dp)
            result = module.weight_and_optimizer_bytes(n, dp, zero1)
            if abs(result - expected) > 0.5:
                raise Fail(f"weight_and_optimizer_bytes({n:,}, dp={dp}, distributed_optimizer={zero1}) = "
                           f"{result:,.0f}, expected {expected:,.0f} (the distributed optimizer shards only the "
                           "fp32 master weights and Adam's moments over the data-parallel ranks)")
    return [f"{sum(want.values())} bytes per parameter; 345M at TP=4: {n * 18 / 2**20:,.0f} MiB per rank "
            f"({n:,} parameters); with ZeRO-1 at DP=2: {n * 12 / 2**20:,.0f} MiB, at DP=1 no saving at all"]


# the run both layouts share; the learner's ARGS go to both, except the layout flags (the reference is TP=PP=1)
COMMON = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
          "--global-batch-size 8 --train-iters 4 --lr 5e-3 --lr-decay-style constant --clip-grad 1.0 "
          "--mock-data --vocab-size 300 --seed 1234 --log-interval 1 --eval-interval 100 --eval-iters 0").split()
LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")


def _without_layout(args: list[str]) -> list[str]:
    out, it = [], iter(args)
    for a in it:
        if a in LAYOUT_FLAGS:
            next(it, None)
        elif not a.startswith(tuple(f + "=" for f in LAYOUT_FLAGS)):
            out.append(a)
    return out
# float32: the layouts add the same numbers in another order (TP splits matmuls and the softmax sum, DP
# averages over ranks): losses of ~5.7 move by a few ulps (4.8e-7) per iteration; 2e-5 leaves room for 4 steps
LOSS_TOL = 2e-5


def _losses(path: str) -> dict[int, float]:
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, open(path)) if r["kind"] == "train"}


def check_layout(module) -> list[str]:
    from lessons_pkg.launch import LaunchError, torchrun

    nproc, args = module.NPROC, list(module.ARGS)
    if not isinstance(nproc, int) or nproc < 1:
        raise Fail(f"NPROC must be the number of processes TP=2 x PP=2 x DP=2 needs, got {nproc!r}")
    if nproc != 8:
        raise Fail(f"NPROC = {nproc}: world size = TP x PP x DP, so DP = {nproc} / (TP x PP); this must be DP=2")
    with tempfile.TemporaryDirectory() as folder:
        ref_log, log = os.path.join(folder, "tp1.jsonl"), os.path.join(folder, "3d.jsonl")
        torchrun(str(SCRIPT), *COMMON, *_without_layout(args), "--log-json", ref_log, nproc_per_node=1, timeout=300,
                 echo=False, cwd=folder)
        try:
            result = torchrun(str(SCRIPT), *COMMON, *args, "--log-json", log, nproc_per_node=nproc, timeout=600,
                              echo=False, cwd=folder)
        except LaunchError as e:
            raise Fail(f"your run failed:\n{str(e)[-1500:]}") from None
        layout = re.search(r"data-parallel size: (\d+), context-parallel size: \d+, tensor-model-parallel size: "
                           r"(\d+), pipeline-model-parallel size: (\d+)", result.output)
        if not layout or layout.groups() != ("2", "2", "2"):
            raise Fail(f"the run's layout (DP, TP, PP) was {layout.groups() if layout else 'not printed'}; "
                       "the exercise asks for TP=2 x PP=2 x DP=2")
        reference, yours = _losses(ref_log), _losses(log)
    lines = []
    for it, ref in sorted(reference.items()):
        got = yours.get(it)
        if got is None or not abs(got - ref) <= LOSS_TOL:  # NaN fails too
            raise Fail(f"iteration {it}: TP=1 loss {ref:.6f}, yours {got if got is None else f'{got:.6f}'} "
                       f"(allowed difference {LOSS_TOL:g}: float32, the same sums in another order).\n"
                       "Both runs start from the same weights and see the same samples in the same order; what "
                       "else in a training step is random, and is it drawn the same way on 1 and on 8 ranks?")
        lines.append(f"iteration {it}: TP=1 {ref:.6f}, TP2xPP2xDP2 {got:.6f} (|diff| {abs(got - ref):.1e} <= {LOSS_TOL:g})")
    return lines


EXERCISES = [
    Exercise("ch6d.1", "parameters per tensor rank (345M at TP=4: how many?)", "ch6d/params.py",
             "see the count: 'number of parameters on (tensor, pipeline) model parallel rank' in pretrain_gpt.py's log",
             check_params),
    Exercise("ch6d.2", "bytes per parameter of weights and optimizer, with and without ZeRO-1", "ch6d/memory.py",
             "compare: python src/ch6/pretrain_gpt.py ... --use-distributed-optimizer", check_bytes),
    Exercise("ch6d.3", "make a TP=2 x PP=2 x DP=2 run reproduce the TP=1 loss curve", "ch6d/layout.py",
             "on a cluster: salloc -N 2 --ntasks-per-node=1, then srun torchrun --nnodes 2 --nproc_per_node 4 "
             "(src/ch6/slurm/README.md)", check_layout),
]
