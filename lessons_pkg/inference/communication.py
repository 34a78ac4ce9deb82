"""The messages of generation: hidden states stage to stage, logits to the sampler, tokens to everyone.

One decoding step on a TP x PP model::

    stage 0 ──hidden [b, s, h]──> stage 1 ──> ... ──> last stage           (StageLink, point to point)
    last stage: each TP rank holds logits [b, V/tp] of the last position
                ──gather──> TP rank 0 of the last stage, "the sampler",    (gather_to_sampler)
                which sees the full vocabulary and picks the tokens
    sampler ──tokens [b]──> every rank of the model                        (StepSync, one all-reduce)

How the ranks agree on a sampled token: exactly one rank draws it, from the
full-vocabulary distribution; every other rank contributes zeros to an
all-reduce (MAX) in which the sampler contributes the ids (>= 0), so every
rank receives exactly the sampler's ids. (:func:`share` does the same for
floats with SUM: x + 0 + ... + 0 = x exactly.) No two ranks ever have to draw
the same random numbers, so no random state needs to be kept in step. The
same all-reduce carries the cancel flags of rank 0 (a client that went away)
and an error flag from any rank, so one collective per step keeps all ranks
in step. The first stage then embeds the token; the other ranks need it to
know when every sequence has stopped.

The model group (every rank of one TP x PP replica) is the tensor group when
PP = 1, the pipeline group when TP = 1, and otherwise a group created from
the ranks of both, once, by the members only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() and group is not None else 0


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` in group order (``[0]`` without torch.distributed)."""
    if not dist.is_initialized() or group is None:
        return [dist.get_rank() if dist.is_initialized() else 0]
    return dist.get_process_group_ranks(group)


def model_group(tp_group, pp_group):
    """A group of every rank of this model replica (see the module docstring); collective over those ranks."""
    if _world(pp_group) == 1:
        return tp_group
    if _world(tp_group) == 1:
        return pp_group
    mine = torch.tensor(group_ranks(tp_group), dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(_world(pp_group))]
    dist.all_gather(everyone, mine, group=pp_group)                  # each stage's tensor group
    ranks = sorted(int(r) for t in everyone for r in t)
    return dist.new_group(ranks, use_local_synchronization=True)      # only these ranks take part


class StageLink:
    """Point-to-point hidden states between pipeline neighbours (same TP rank, next/previous stage)."""

    def __init__(self, pp_group):
        self.pp_rank, self.pp_size = _rank(pp_group), _world(pp_group)
        ranks = group_ranks(pp_group)
        self.prev = ranks[self.pp_rank - 1] if self.pp_rank > 0 else None
        self.next = ranks[self.pp_rank + 1] if self.pp_rank < self.pp_size - 1 else None

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.prev)
        return x

    def send_forward(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), dst=self.next)


def gather_to_sampler(logits: torch.Tensor, tp_group) -> torch.Tensor | None:
    """This rank's vocabulary slice ``[b, V/tp]`` -> the full ``[b, V_padded]`` on TP rank 0, None elsewhere."""
    world = _world(tp_group)
    if world == 1:
        return logits
    logits = logits.contiguous()
    if _rank(tp_group) == 0:
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.gather(logits, parts, group_dst=0, group=tp_group)
        return torch.cat(parts, dim=-1)                               # slices in rank order = vocabulary order
    dist.gather(logits, None, group_dst=0, group=tp_group)
    return None


def share(values: torch.Tensor, mine: bool, group) -> torch.Tensor:
    """Every rank of ``group`` gets ``values`` of the one rank where ``mine`` (others pass zeros of that shape)."""
    if _world(group) == 1:
        return values
    out = values.clone() if mine else torch.zeros_like(values)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class StepSync:
    """The per-step all-reduce (MAX, int64) over the model group: ``[sampler's part | rank 0's part | error]``.

    Generation sends ``[tokens b | cancel b | error]``; beam search sends
    ``[tokens | parent beams | done | (nothing from rank 0) | error]``. Each
    slot has one contributor (values >= 0, zeros elsewhere) except the error
    slot, where any failing rank writes its rank + 1.
    """

    def __init__(self, group, n_sampler: int, n_rank0: int, device):
        self.group, self.n1, self.n2, self.device = group, n_sampler, n_rank0, device

    def exchange(self, sampler: torch.Tensor | None, rank0: torch.Tensor | None, error_rank: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Returns ``(sampler's values, rank 0's values, failed rank or None)`` on every rank."""
        n1, n2 = self.n1, self.n2
        msg = torch.zeros(n1 + n2 + 1, dtype=torch.int64, device=self.device)
        if sampler is not None:
            msg[:n1] = sampler
        if rank0 is not None:
            msg[n1:n1 + n2] = rank0
        if error_rank is not None:
            msg[-1] = error_rank + 1
        if _world(self.group) > 1:
            dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=self.group)
        failed = int(msg[-1]) - 1
        return msg[:n1], msg[n1:n1 + n2], (failed if failed >= 0 else None)
