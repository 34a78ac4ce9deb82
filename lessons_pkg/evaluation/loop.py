"""The distributed evaluation: every rank's share of the samples through its TP x PP stage, sums all-reduced.

The ranks form Megatron's grid (:mod:`lessons_pkg.parallel_state`): a model
replica is a pipeline of ``pp`` stages of ``tp`` ranks each, and there are
``dp = world / (tp x pp)`` replicas. Replica ``d`` evaluates the samples
``d, d + dp, d + 2 dp, ...`` (every rank of a replica, whatever its stage,
agrees on the list, so they run the same micro-batches)::

    samples --(split over DP)--> micro-batches of --micro-batch-size
        first stage: ids [b, s] ---stage 0 ... stage pp-1 (pipeline executor, forward only)--->
        last stage:  logits [b, s, V/tp] -> score_batch -> per sample (nll sum, scored tokens, correct)

A micro-batch pads its samples to its longest one with the end-of-document id;
attention is causal, so padding after a sample never changes its predictions,
and padding is never scored. The totals (examples, correct, scored tokens as
integers, the sum of ``-log p`` in float64) are all-reduced over the whole
world from the last stage's tensor-rank-0 ranks, so every rank, global rank 0
included, ends with the same numbers. Per-sample results are gathered too, for
reports and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lessons_pkg import parallel_state as ps
from lessons_pkg.evaluation.scoring import score_batch
from lessons_pkg.evaluation.windows import Sample
from lessons_pkg.pipeline import forward_backward


@dataclass
class Totals:
    examples: int = 0
    correct: int = 0
    tokens: int = 0                  # scored labels
    nll: float = 0.0                 # sum of -log p over scored labels (nats)
    per_sample: list[tuple[int, float, int, int]] = field(default_factory=list, repr=False)  # (index, nll, tokens, correct)


def microbatches(samples: list[Sample], indices: list[int], micro_batch_size: int, pad_id: int
                 ) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(sample indices, input ids [b, s], labels [b, s], mask [b, s])`` per micro-batch, padded to its longest."""
    out = []
    for first in range(0, len(indices), micro_batch_size):
        chunk = indices[first:first + micro_batch_size]
        length = max(len(samples[i].tokens) for i in chunk)
        tokens = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length - 1), dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens[row, :len(samples[i].tokens)] = torch.tensor(samples[i].tokens)
            mask[row, :len(samples[i].mask)] = torch.tensor(samples[i].mask)
        out.append((chunk, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask))
    return out


def evaluate_samples(model, samples: list[Sample], micro_batch_size: int, pad_id: int, vocab_size: int,
                     progress=None, calls_per_update: int = 4) -> Totals:
    """Score ``samples`` with this rank's stage ``model``; every rank returns the same :class:`Totals`.

    ``model`` is a :class:`ParallelGPT` stage (eval mode) built for this rank's
    tensor and pipeline rank (:func:`lessons_pkg.checkpoint.pretrained.build_stage`);
    the groups come from :mod:`lessons_pkg.parallel_state`. ``progress`` (a
    tqdm bar, or None) advances by the samples the whole job finished.
    """
    if micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    last_stage = ps.is_pipeline_last_stage()
    device = next(model.parameters()).device

    def loss_fn(logits, target):
        labels, mask = target
        return score_batch(logits, labels, mask, vocab_size, tp_group)      # [b, 3]

    mine = list(range(dp_rank, len(samples), dp))
    batches = microbatches(samples, mine, micro_batch_size, pad_id)
    per_call = calls_per_update * ps.get_pipeline_model_parallel_world_size()  # micro-batches per executor call
    local: list[tuple[int, float, int, int]] = []
    with torch.no_grad():
        for first in range(0, len(batches), per_call):
            group = batches[first:first + per_call]
            inputs = [x.to(device) for _, x, _, _ in group]
            targets = [(y.to(device), m.to(device)) for _, _, y, m in group]
            stats = forward_backward([model], "1f1b", inputs, targets, loss_fn, group=pp_group, forward_only=True)
            if last_stage:
                for (chunk, _, _, _), s in zip(group, stats):
                    local += [(i, float(row[0]), int(row[1]), int(row[2])) for i, row in zip(chunk, s.cpu())]
            if progress is not None:
                progress.update(min(sum(len(c) for c, *_ in group) * dp, progress.total - progress.n))
    return _reduce(local, len(samples), last_stage and ps.get_tensor_model_parallel_rank() == 0, ps.get_device())


def _reduce(local: list, num_samples: int, contributes: bool, device: torch.device) -> Totals:
    """All-reduce the totals over the world; gather the per-sample rows; check every sample was scored once."""
    local = local if contributes else []
    counts = torch.tensor([len(local), sum(r[3] for r in local), sum(r[2] for r in local)], dtype=torch.int64, device=device)
    nll = torch.tensor([sum(r[1] for r in local)], dtype=torch.float64, device=device)
    rows = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)                     # integers: exact in any order
        dist.all_reduce(nll)                        # float64 sum of per-rank float64 sums
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, local)
    per_sample = sorted(r for part in rows for r in part)
    examples, correct, tokens = (int(c) for c in counts)
    if examples != num_samples or [r[0] for r in per_sample] != list(range(num_samples)):
        raise RuntimeError(f"{examples} samples were scored but there are {num_samples}: the data-parallel split "
                           "lost or repeated some")
    return Totals(examples, correct, tokens, float(nll), per_sample)


class _LineWriter:
    """A file for tqdm that ends every refresh with a newline: readable in logs and under torchrun's redirects."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, unit: str, enabled: bool = True, every: int | None = None):
    """A tqdm bar on stdout (redrawn in place on a terminal, one line every 10 s otherwise), or None.

    ``every`` (``--log-interval`` x micro-batch size): a line each time that many more samples are done instead.
    """
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    if every is not None:
        return tqdm(total=total, unit=f" {unit}", file=_LineWriter(sys.stdout), miniters=every, mininterval=0,
                    maxinterval=float("inf"), ascii=True)  # else tqdm's monitor resets miniters after 10 s
    if sys.stdout.isatty():
        return tqdm(total=total, unit=f" {unit}", file=sys.stdout)
    return tqdm(total=total, unit=f" {unit}", file=_LineWriter(sys.stdout), mininterval=10, ascii=True)
