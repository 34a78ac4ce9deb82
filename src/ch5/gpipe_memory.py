"""GPipe's re-materialisation, measured: what torchgpipe keeps for the backward with checkpoint='never', 'except_last', 'always'.

    python src/ch5/gpipe_memory.py                              # tiny GPT-2, balance 2 2 1 1, batch 8 in 4 micro-batches
    python src/ch5/gpipe_memory.py --chunks 8 --balance 3 3

Without re-materialisation a GPipe stage keeps every activation of every
micro-batch from its forward to its backward. With it (activation
checkpointing) a partition keeps only the *input* of each micro-batch and
recomputes the rest just before the backward. torchgpipe's ``checkpoint``
argument says for which micro-batches:

    'never'        none: every activation of every micro-batch stays (GPipe without re-materialisation)
    'except_last'  all but the last micro-batch (torchgpipe's default: the last one's backward comes
                   right after its forward, so recomputing it would cost time and save nothing)
    'always'       every micro-batch

What autograd saves is counted with the saved-tensor hooks of
``lessons_pkg/pipeline/memory.py``, the meter that measures 1F1B's memory
(``pipeline_memory.py``). torchgpipe computes its partitions in worker threads,
where the hooks of the main thread do not apply, so :func:`saved_in_gpipe_workers`
enters the meter in those threads too. Everything runs on the CPU, all
partitions on one device: the counts are the whole pipeline's.

The predictions come from one micro-batch run through each partition alone,
without a pipeline: ``I_j`` the bytes of partition j's input, ``A_j`` what
partition j saves (``R_j`` of it besides the input itself), ``L`` what the loss
saves for the whole mini-batch; m micro-batches::

    kept from the forward to the backward    never        m sum_j A_j + L
                                             except_last  (m - 1) sum_j I_j + sum_j A_j + L
                                             always       m sum_j I_j + L

(the token ids of all micro-batches are views of one tensor, counted once).
Without re-materialisation that is also the peak. With it the peak comes in the
backward: each micro-batch's partition is recomputed just before its backward
(``R_j`` more) and freed by it. :func:`recorded_rematerialisation` notes when
torchgpipe does so, and replaying those events over the kept inputs must give
the measured peak. On the CPU every partition sits on one device, so cells
recomputed at the same time add up; on n GPUs they sit on n devices, and each
device holds its partition's inputs plus the cells it recomputes. For a batch of
N, L layers on K devices and M micro-batches that is GPipe's O(N + L/K x N/M)
per device, against O(N x L/K) without re-materialisation (Huang et al., 2019).

Lines that start with ``check:`` are the verifications; the exit status is 1 if one fails.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torchgpipe.worker
from torch import nn
from torchgpipe import GPipe
from torchgpipe.checkpoint import Checkpoint, Recompute
from transformers import GPT2LMHeadModel

from lessons_pkg.pipeline.memory import SavedTensorMeter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_sequential import dropout_disabled, lm_loss, sequential_from_hf, tiny_config  # noqa: E402

warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # torchgpipe 0.0.7 calls tensor.storage()

MiB = 2**20
MODES = ("never", "except_last", "always")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--balance", type=int, nargs="+", default=[2, 2, 1, 1], help="layers per partition (embedding, blocks, head)")
    p.add_argument("--chunks", type=int, default=4, help="micro-batches per mini-batch")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@contextlib.contextmanager
def saved_in_gpipe_workers(meter: SavedTensorMeter):
    """Count, with ``meter``, what autograd saves inside torchgpipe's worker threads (started while this is active).

    Saved-tensor hooks are thread-local. torchgpipe starts its threads with the
    module-level function ``torchgpipe.worker.worker`` at every forward; for the
    duration, that function enters ``meter.in_this_thread()`` first.
    """
    original = torchgpipe.worker.worker

    def worker(*args):
        with meter.in_this_thread():
            return original(*args)

    torchgpipe.worker.worker = worker
    try:
        yield meter
    finally:
        torchgpipe.worker.worker = original


@dataclass(frozen=True)
class Memory:
    """Bytes saved for the backward: at the end of the forward (the loss computed) and at the peak of the step.

    ``events``: torchgpipe's re-materialisations in the order they ran, ``("recompute", j)`` before the
    backward of a micro-batch on partition j and ``("backward", j)`` after it.
    """

    after_forward: int
    peak: int
    events: tuple = ()


@contextlib.contextmanager
def recorded_rematerialisation(pipe: GPipe, events: list):
    """Append ``("recompute", j)`` / ``("backward", j)`` to ``events`` as torchgpipe re-materialises and back-propagates
    a checkpointed micro-batch of partition j (its ``Recompute`` and ``Checkpoint`` autograd functions)."""
    index = {id(partition): j for j, partition in enumerate(pipe.partitions)}

    def partition_of(ctx) -> int:
        return index[id(ctx.function.__defaults__[0])]  # torchgpipe 0.0.7: function(input, partition=..., ...)

    recompute, checkpoint = Recompute.backward, Checkpoint.backward

    def recompute_backward(ctx, *grads):
        result = recompute(ctx, *grads)
        events.append(("recompute", partition_of(ctx)))
        return result

    def checkpoint_backward(ctx, *grads):
        result = checkpoint(ctx, *grads)
        events.append(("backward", partition_of(ctx)))
        return result

    Recompute.backward, Checkpoint.backward = staticmethod(recompute_backward), staticmethod(checkpoint_backward)
    try:
        yield events
    finally:
        Recompute.backward, Checkpoint.backward = staticmethod(recompute), staticmethod(checkpoint)


def measure(seq: nn.Sequential, balance: list[int], chunks: int, checkpoint: str, input_ids: torch.Tensor) -> Memory:
    """One forward and backward of ``input_ids`` through ``GPipe(seq, ..., checkpoint=checkpoint)``; gradients left zeroed."""
    pipe = GPipe(seq, balance=balance, devices=["cpu"] * len(balance), chunks=chunks, checkpoint=checkpoint)
    labels = input_ids.clone()  # its own storage: the loss's saved target is not the pipeline's input
    meter, events = SavedTensorMeter(exclude=list(pipe.parameters())), []
    with dropout_disabled(pipe), saved_in_gpipe_workers(meter), recorded_rematerialisation(pipe, events), meter:
        loss = lm_loss(pipe(input_ids), labels)
        after_forward = meter.live
        loss.backward()
    pipe.zero_grad(set_to_none=True)
    if meter.live != 0:
        raise RuntimeError(f"{meter.live} bytes are still saved after the backward (checkpoint={checkpoint!r})")
    return Memory(after_forward, meter.peak, tuple(events))


@dataclass(frozen=True)
class Cells:
    """One micro-batch through each partition alone, in bytes: input ``I``, saved ``A = S + R``; the loss ``L``."""

    inputs: list[int]       # I_j: the partition's input (token ids for j = 0, then hidden states)
    own_input: list[int]    # S_j: the part of A_j that is the input itself (I_j if the first layer saves it, else 0)
    rest: list[int]         # R_j: everything else partition j saves (what re-materialisation recomputes)
    loss: int               # L: what the loss saves, for the whole mini-batch

    @property
    def saved(self) -> list[int]:
        return [s + r for s, r in zip(self.own_input, self.rest)]


def cells(seq: nn.Sequential, balance: list[int], micro_ids: torch.Tensor, chunks: int) -> Cells:
    """Measure ``I_j``, ``S_j``, ``R_j`` on one micro-batch ``micro_ids`` ``[b, seq]`` and ``L`` on ``chunks`` of them."""
    params = list(seq.parameters())
    edges = [sum(balance[:j]) for j in range(len(balance) + 1)]
    inputs, own, rest = [], [], []
    x = micro_ids.clone()
    with dropout_disabled(seq):
        for a, b in zip(edges, edges[1:]):
            part = seq[a:b]
            if x.is_floating_point():
                x = x.detach().requires_grad_()  # the partition's graph starts here, as in the pipeline
            # twice: saved-tensor hooks do not nest (only the innermost pair sees a tensor)
            with SavedTensorMeter(exclude=params) as with_input:
                y = part(x)
            with SavedTensorMeter(exclude=params + [x]) as without_input:
                part(x)
            inputs.append(x.untyped_storage().nbytes())
            own.append(with_input.peak - without_input.peak)
            rest.append(without_input.peak)
            x = y
        # the pipeline gathers the micro-batches' logits and takes one loss over the mini-batch
        logits = torch.cat([y.detach()] * chunks).requires_grad_()  # [batch, seq, vocab]
        with SavedTensorMeter() as loss_meter:
            loss = lm_loss(logits, torch.cat([micro_ids] * chunks))
        del loss
    return Cells(inputs, own, rest, loss_meter.peak)


def whole_model_saved(seq: nn.Sequential, micro_ids: torch.Tensor) -> int:
    """Bytes one micro-batch saves through the unpartitioned model (a storage two partitions share counts once)."""
    with dropout_disabled(seq), SavedTensorMeter(exclude=list(seq.parameters())) as meter:
        seq(micro_ids.clone())
    return meter.peak


def kept(c: Cells, chunks: int, checkpoint: str) -> int:
    """Bytes kept from the forward to the backward (the loss computed), from the cells' sizes."""
    m, n = chunks, len(c.inputs)
    stop = {"always": m, "except_last": m - 1, "never": 0}[checkpoint]  # micro-batches i < stop are re-materialised
    ids = m * c.inputs[0] if (stop > 0 or c.own_input[0] > 0) else 0   # one storage for all micro-batches' ids
    hidden = sum((c.inputs[j] if i < stop else c.saved[j]) for i in range(m) for j in range(1, n))
    return ids + hidden + sum(c.rest[0] for i in range(stop, m)) + c.loss


def replayed_peak(c: Cells, chunks: int, events: tuple) -> int:
    """The peak of checkpoint='always': the kept inputs, plus the recomputed cells alive at each moment of ``events``."""
    live = peak = kept(c, chunks, "always")
    live -= c.loss  # the loss's backward runs first and frees what it saved
    for what, j in events:
        live += c.rest[j] if what == "recompute" else -c.rest[j] - (c.inputs[j] if j > 0 else 0)  # ids: freed last
        peak = max(peak, live)
    return peak


def most_at_once(events: tuple) -> int:
    """The most micro-batch cells that were re-materialised at the same time."""
    alive = most = 0
    for what, _ in events:
        alive += 1 if what == "recompute" else -1
        most = max(most, alive)
    return most


def run_checks(seq: nn.Sequential, balance: list[int], chunks: int, input_ids: torch.Tensor) -> tuple[dict, list[tuple[str, bool]]]:
    """Measure the three modes, compare them with the predictions; return (measured, [(check line, passed)])."""
    if input_ids.size(0) % chunks:
        raise ValueError(f"the batch size ({input_ids.size(0)}) must be a multiple of the chunks ({chunks})")
    micro = input_ids[: input_ids.size(0) // chunks]
    c = cells(seq, balance, micro, chunks)
    whole = whole_model_saved(seq, micro)
    measured = {mode: measure(seq, balance, chunks, mode, input_ids) for mode in MODES}
    never, always = measured["never"], measured["always"]
    cells_total = chunks * len(balance)
    checks = [
        ("the partitions share no saved tensor: their savings add up to the whole model's", sum(c.saved) == whole),
        ("'never' keeps every activation of every micro-batch, m x (one micro-batch) + the loss, to the byte; "
         "that is its peak", never.after_forward == never.peak == kept(c, chunks, "never") == chunks * whole + c.loss),
        ("'except_last' keeps m - 1 micro-batches' inputs and all of the last one, to the byte",
         measured["except_last"].after_forward == kept(c, chunks, "except_last")),
        ("'always' keeps only the partitions' inputs, m x sum of I_j + the loss, to the byte",
         always.after_forward == kept(c, chunks, "always") == chunks * sum(c.inputs) + c.loss),
        (f"'always' re-materialised each of the {cells_total} (micro-batch, partition) cells once",
         sorted(always.events) == sorted([("recompute", j) for j in range(len(balance))] * chunks
                                         + [("backward", j) for j in range(len(balance))] * chunks)),
        ("'always' peaks in the backward at the kept inputs + the cells being recomputed, to the byte",
         always.peak == replayed_peak(c, chunks, always.events)),
        ("re-materialisation ('always') holds less than half of 'never''s peak", 2 * always.peak < never.peak),
    ]
    return measured, checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if sum(args.balance) != args.n_layer + 2:
        print(f"error: --balance {args.balance} must sum to the model's {args.n_layer + 2} layers "
              f"(embedding + {args.n_layer} blocks + head)", file=sys.stderr)
        return 2
    model = GPT2LMHeadModel(tiny_config(args.vocab_size, n_positions=max(128, args.seq_len), n_embd=args.n_embd,
                                        n_layer=args.n_layer, n_head=args.n_head))
    seq = sequential_from_hf(model)
    input_ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))  # [batch, seq]
    try:
        measured, checks = run_checks(seq, args.balance, args.chunks, input_ids)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"GPipe on CPU, balance {args.balance}, {args.chunks} micro-batches of {args.batch_size // args.chunks} "
          f"sequences x {args.seq_len} tokens; activations saved for backward (parameters excluded), MiB:")
    print(f"{'checkpoint':12s} {'after forward':>14s} {'peak':>8s}")
    for mode in MODES:
        print(f"{mode:12s} {measured[mode].after_forward / MiB:14.2f} {measured[mode].peak / MiB:8.2f}")
    print(f"at most {most_at_once(measured['always'].events)} of the {args.chunks * len(args.balance)} cells were "
          "re-materialised at the same time (checkpoint='always')")
    for line, ok in checks:
        print(f"check: {line}: {ok}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
