"""PipeDream-Flush (1F1B) with DeepSpeed: GPT-2 as a PipelineModule, one pipeline stage per rank.

    deepspeed --num_gpus 4 src/ch5/pipe_dream.py                        # 4 GPUs, 4 stages
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 src/ch5/pipe_dream.py     # CPU: 2 processes, gloo
    torchrun --nproc_per_node 4 src/ch5/pipe_dream.py                   # torchrun works too
    python src/ch5/pipe_dream.py [--nproc 4]                            # and so does plain python (4 stages)
    deepspeed --num_gpus 4 src/ch5/pipe_dream.py --model-name gpt2 --dataset squad \\
        --micro-batch-size 4 --micro-batches 4 --seq-len 256 --steps 300    # the lesson's run (network)

``deepspeed --num_gpus N`` starts N processes whether or not there are GPUs;
with ``DS_ACCELERATOR=cpu`` (and no oneCCL installed) DeepSpeed uses gloo.

What happens:

1. The model is a list of layer specs (token embedding, position embedding,
   n blocks, final LayerNorm, LM head). ``PipelineModule`` assigns them to
   ``num_stages`` = world size stages with ``partition_method="type:GPT2Block"``:
   the blocks are spread evenly, the other layers join the first or the last
   stage. Each rank builds only its own stage's layers.
2. The LM head and the token embedding are one ``TiedLayerSpec`` ("wte"):
   the first and the last stage each hold a copy, and DeepSpeed all-reduces
   the copies' gradients between those two stages so they stay equal.
3. ``engine.train_batch()`` runs one mini-batch of ``--micro-batches``
   micro-batches with DeepSpeed's 1F1B schedule (PipeDream-Flush: one weight
   version, a flush and an optimizer step at the end of every mini-batch).
4. The first mini-batch is checked against the single-process
   ``GPT2LMHeadModel`` built from the same weights on every rank: the loss,
   and on every stage the gradient of every parameter it holds.

DeepSpeed's log is cut to the lines about the pipeline (:class:`PipelineLog`):
the partition (``stage=0 layers=3`` and the layers), ``CONFIG: micro_batches=4``
(the micro-batches of each step: 1 would mean no pipelining at all) and one
``RANK=.. STAGE=.. STAGE_PARAMS=.. TOTAL_PARAMS=.. UNIQUE_PARAMS=..`` line per
stage; rank 0 checks the last two counts against ``GPT2LMHeadModel``.

Lines that start with ``check:`` are the verifications; the exit status is 1 if one fails.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from transformers import GPT2Config, GPT2LMHeadModel

from lessons_pkg.launch import add_nproc_argument, start_ranks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpipe import build_model, build_tokens  # noqa: E402  (shared with the GPipe demo)
from gpt2_sequential import CausalGPT2Block, dropout_disabled, lm_loss  # noqa: E402
from text_data import random_windows  # noqa: E402
from lessons_pkg.utils import largest, max_abs_error, within  # noqa: E402

# PipelineModule broadcasts the tied embedding from the first to the last stage
# when it is built, in place and with autograd on; PyTorch then warns, at the
# first backward, that it passes gradients through that broadcast unchanged.
# That is harmless here (the broadcast does not depend on the loss), and the
# gradient check below would catch it if it were not.
warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")

# float32, as in gpipe.py: micro-batching and the stage split change only the
# order of floating-point reductions (observed ~1e-7 on CPU).
TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-name", default=None, help="pretrained model from the hub (e.g. gpt2); default: tiny fresh GPT-2")
    p.add_argument("--dataset", default="stdlib", choices=["stdlib", "squad"])
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per mini-batch (gradient accumulation steps)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="mini-batches (engine.train_batch calls)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 1e-3, 3e-5 for a pretrained model)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    add_nproc_argument(p, default=4)
    return p.parse_args(argv)


class PositionEmbedding(nn.Module):
    """Adds GPT-2's learned position embeddings, then dropout: ``[batch, seq, hidden] -> [batch, seq, hidden]``."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.size(1), device=hidden.device)  # [seq]
        return self.drop(hidden + self.wpe(positions))


def tied_lm_logits(wte: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head as the tied token embedding: ``[batch, seq, hidden] @ wte^T -> [batch, seq, vocab]``."""
    return F.linear(hidden, wte.weight)


def pipeline_layers(config: GPT2Config) -> list:
    """GPT-2 as DeepSpeed layer specs (a spec is built only on the stage that owns it).

    The token embedding ``wte`` appears twice under one key: the first stage
    uses it as an embedding (ids -> hidden), the last stage as the LM head
    (``tied_lm_logits``). Each of the two stages holds a copy, and DeepSpeed
    all-reduces their gradients so the copies stay equal.
    """
    return [
        TiedLayerSpec("wte", nn.Embedding, config.vocab_size, config.n_embd, tied_weight_attr="weight"),
        LayerSpec(PositionEmbedding, config),
        *[LayerSpec(CausalGPT2Block, config, layer_idx=i) for i in range(config.n_layer)],
        LayerSpec(nn.LayerNorm, config.n_embd, eps=config.layer_norm_epsilon),
        TiedLayerSpec("wte", nn.Embedding, config.vocab_size, config.n_embd, forward_fn=tied_lm_logits,
                      tied_weight_attr="weight"),
    ]


def hf_name(name: str, n_layer: int) -> str:
    """The ``GPT2LMHeadModel`` parameter behind a ``PipelineModule`` parameter name.

    Layer indices follow :func:`pipeline_layers`: ``tied_modules.wte.weight`` ->
    ``transformer.wte.weight``, ``1.wpe.weight`` -> ``transformer.wpe.weight``,
    ``2.attn.c_attn.weight`` -> ``transformer.h.0.attn.c_attn.weight``,
    ``{n_layer + 2}.weight`` -> ``transformer.ln_f.weight``.
    """
    if name == "tied_modules.wte.weight":
        return "transformer.wte.weight"
    index, rest = name.split(".", 1)
    index = int(index)
    if index == 1:
        return f"transformer.{rest}"
    if index == n_layer + 2:
        return f"transformer.ln_f.{rest}"
    return f"transformer.h.{index - 2}.{rest}"


class PipelineLog(logging.Filter):
    """Of DeepSpeed's INFO lines, let through those that describe the pipeline; keep their messages in ``lines``.

    ``CONFIG: micro_batches=4 micro_batch_size=2``: the micro-batches per step (rank 0), and on every stage
    ``RANK=0 STAGE=0 LAYERS=3 [0, 3) STAGE_PARAMS=... TOTAL_PARAMS=... UNIQUE_PARAMS=...``: its layers and
    parameters, where TOTAL_PARAMS sums every stage's and UNIQUE_PARAMS counts a tied copy once. Warnings
    and errors pass as well; the rest (the configuration dump, the optimizer) does not.
    """

    KEEP = ("CONFIG: micro_batches=", "RANK=")

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.getMessage().startswith(self.KEEP):
            self.lines.append(record.getMessage())
            return True
        return False


def show_pipeline_log_only(logger: logging.Logger) -> PipelineLog:
    """Let ``logger`` (DeepSpeed's) print its warnings and its pipeline lines (:class:`PipelineLog`), nothing else.

    DeepSpeed 0.19 sets its logger *and* the logger's stdout handler to WARNING, which hides every INFO
    line (0.15 printed them all); both go down to INFO here, and the filter picks the lines.
    """
    log = PipelineLog()
    logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        handler.setLevel(logging.INFO)
    logger.addFilter(log)
    return log


def logged_param_counts(lines: list[str]) -> dict[str, int]:
    """``{'STAGE_PARAMS': .., 'TOTAL_PARAMS': .., 'UNIQUE_PARAMS': ..}`` from this stage's ``RANK=`` line; {} if none."""
    for line in lines:
        if line.startswith("RANK="):
            return {key: int(value) for key, value in re.findall(r"(\w+_PARAMS)=(\d+)", line)}
    return {}


def skip_cpu_inference_all_reduce_build() -> None:
    """On the CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce for *inference*
    (``deepspeed_shm_comm``, about a minute of C++ in every new environment) when it initialises. Training
    never calls it (without it, DeepSpeed's ``inference_all_reduce`` falls back to ``torch.distributed``), so
    mark it unavailable before ``init_distributed``. On a GPU nothing changes."""
    if not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False  # the table DeepSpeed reads before building


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_ranks(args)  # plain python: start 4 ranks under torchrun; under a launcher: already a rank
    pipeline_log = show_pipeline_log_only(deepspeed.utils.logger)
    skip_cpu_inference_all_reduce_build()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # same seed on every rank: the same reference weights everywhere
    # An unavailable model or dataset fails alike on every rank (no collective before this) and rank 0 says
    # why. A failure on some ranks only (a flaky hub download) leaves the others waiting in the first
    # collective until the launcher's timeout ends the job.
    try:
        reference, pretrained = build_model(args) if rank == 0 else _quiet(build_model, args)
        tokens = build_tokens(args, pretrained) if rank == 0 else _quiet(build_tokens, args, pretrained)
    except RuntimeError as error:
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    config = reference.config
    lr = args.lr or (3e-5 if pretrained else 1e-3)
    if world_size > config.n_layer:
        raise ValueError(f"{world_size} pipeline stages need at least as many GPT-2 blocks, "
                         f"but the model has n_layer {config.n_layer}")

    module = PipelineModule(layers=pipeline_layers(config), num_stages=world_size,
                            partition_method="type:GPT2Block", loss_fn=lm_loss)
    reference_params = dict(reference.named_parameters())
    module.load_state_dict({k: reference_params[hf_name(k, config.n_layer)].detach().clone()
                            for k in module.state_dict()})

    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    grads_before_first_step: dict[str, torch.Tensor] = {}

    def keep_first_gradients(opt, *_):
        if not grads_before_first_step:
            for name, p in module.named_parameters():
                if p.grad is not None:
                    grads_before_first_step[name] = p.grad.detach().clone()

    hook = optimizer.register_step_pre_hook(keep_first_gradients)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer,
        config={
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": args.micro_batches,  # = micro-batches per pipeline flush
            "train_batch_size": args.micro_batch_size * args.micro_batches,  # one data-parallel replica
            "steps_per_print": 10**9,
            # DeepSpeed 0.19 clips the gradient norm to 1.0 unless told otherwise: off, so the
            # update is plain Adam (as in gpipe.py) and the check below sees the raw gradients.
            "gradient_clipping": 0.0,
        },
    )
    if rank == 0:
        print(f"GPT-2: {config.n_layer} blocks, hidden {config.n_embd}, vocab {config.vocab_size}; "
              f"{world_size} pipeline stages, {args.micro_batches} micro-batches of "
              f"{args.micro_batch_size} sequences x {args.seq_len} tokens; layers 0 and {config.n_layer + 3} "
              "are one tied token embedding (input embedding and LM head)", flush=True)
    ok = check_param_counts(logged_param_counts(pipeline_log.lines), reference, rank)

    # First and last stage each read the batches; the same seed gives both the same ones.
    batches = random_windows(tokens, args.micro_batch_size, args.seq_len, seed=args.seed)
    data = ((ids, ids) for ids in batches)  # (inputs, labels); lm_loss shifts the labels

    with dropout_disabled(module, reference):
        first_loss = engine.train_batch(data_iter=data).item()
        ok &= check_first_batch(first_loss, grads_before_first_step, reference, tokens, args, rank)
    hook.remove()
    losses = [first_loss]
    if rank == 0:
        print(f"step {0:4d} | loss {first_loss:.3f}")
    start = time.perf_counter()
    for step in range(1, args.steps):
        loss = engine.train_batch(data_iter=data).item()
        losses.append(loss)
        if rank == 0 and (step % args.log_interval == 0 or step == args.steps - 1):
            print(f"step {step:4d} | loss {loss:.3f}")

    seconds = time.perf_counter() - start
    window = max(1, args.steps // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    fell = last < first
    ok &= fell
    if rank == 0:
        print(f"{args.steps - 1} more steps in {seconds:.1f} s ({seconds / max(args.steps - 1, 1) * 1e3:.0f} ms/step)")
        print(f"mean loss of the first {window} steps {first:.3f}, of the last {window} steps {last:.3f}")
        print(f"check: loss fell (mean of the last {window} steps < mean of the first {window}): {fell}")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def check_param_counts(counts: dict[str, int], reference: GPT2LMHeadModel, rank: int) -> bool:
    """DeepSpeed's own count of the model (its ``RANK=`` log line) against ``GPT2LMHeadModel``'s, on rank 0.

    ``UNIQUE_PARAMS`` must be the tied model's count (``parameters()`` yields the tied matrix once), and
    ``TOTAL_PARAMS`` that plus one more vocab x hidden: the LM head's copy of the embedding on the last stage.
    """
    if rank != 0:
        return True
    config = reference.config
    unique = sum(p.numel() for p in reference.parameters())
    ok = (counts.get("UNIQUE_PARAMS") == unique
          and counts.get("TOTAL_PARAMS") == unique + config.vocab_size * config.n_embd)
    print(f"check: DeepSpeed's UNIQUE_PARAMS is GPT2LMHeadModel's {unique:,} parameters and its TOTAL_PARAMS "
          f"counts the tied embedding twice (+ vocab x hidden = {config.vocab_size * config.n_embd:,}): {ok}")
    if not ok:
        print(f"DeepSpeed logged {counts or 'no RANK= line'}", file=sys.stderr)
    return ok


def check_first_batch(loss: float, grads: dict[str, torch.Tensor], reference: GPT2LMHeadModel,
                      tokens: torch.Tensor, args: argparse.Namespace, rank: int) -> bool:
    """Compare the first mini-batch with the single-process model: loss, and every stage's gradients.

    The reference sees the same micro-batches and is trained on the mean of
    their losses, which is what DeepSpeed's pipeline accumulates.
    """
    micro = random_windows(tokens, args.micro_batch_size, args.seq_len, seed=args.seed)
    ref_losses = []
    for _ in range(args.micro_batches):
        ids = next(micro)  # [micro_batch, seq]
        ref_loss = lm_loss(reference(ids).logits, ids) / args.micro_batches
        ref_loss.backward()
        ref_losses.append(ref_loss.item())
    ref_params = dict(reference.named_parameters())
    n_layer = reference.config.n_layer
    errors = {hf_name(k, n_layer): max_abs_error(g, ref_params[hf_name(k, n_layer)].grad) for k, g in grads.items()}
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (len(grads), largest(errors.values()), sorted(errors)))
    loss_ok = within(abs(loss - sum(ref_losses)), TOLERANCE)
    covered = set().union(*(names for _, _, names in reports))
    grads_ok = all(within(err, TOLERANCE) for _, err, _ in reports) and covered == set(ref_params)
    if rank == 0:
        print(f"check: first mini-batch loss matches GPT2LMHeadModel (error < {TOLERANCE:g}): {loss_ok}")
        for stage, (count, err, _) in enumerate(reports):
            print(f"check: stage {stage}: gradients of its {count} parameters match GPT2LMHeadModel "
                  f"(max error < {TOLERANCE:g}): {within(err, TOLERANCE)}")
        print(f"check: the stages together hold every one of the model's {len(ref_params)} parameters: "
              f"{covered == set(ref_params)}")
    return loss_ok and grads_ok


def _quiet(fn, *args):
    """Call ``fn`` with stdout silenced (ranks other than 0 would repeat rank 0's fallback messages)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
