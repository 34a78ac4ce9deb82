"""Ring attention: each rank's queries meet every rank's keys and values, one rank's block per step.

With ``cp`` ranks, rank r holds the queries, keys and values of its own tokens
(two chunks, see :mod:`.split`). Forward, ``cp`` steps: at step j it holds the
keys and values of rank ``(r - j) mod cp``, computes its queries' attention
over them, chunk pair by chunk pair (a query chunk sees a key chunk before it
fully, its own chunk causally, a later one not at all), merges the result into
its running ``(out, lse)`` (:func:`.online_softmax.merge_partial_attention`),
and passes the block on to rank ``r + 1`` while it computes::

    step 0: rank 0 has kv0, rank 1 has kv1, rank 2 has kv2, ...   then each sends its block to the next
    step 1: rank 0 has kv(cp-1), rank 1 has kv0, rank 2 has kv1, ...

Backward, ``cp`` steps the other way round the ring: the block travels to rank
``r - 1`` together with the gradients of its keys and values accumulated so
far; each rank adds its queries' part (flash attention's backward, from the
saved final ``lse``: ``P = exp(s - lse)``, ``dS = P (dP - rowsum(dO * O))``)
and passes it on; after ``cp`` steps every block's gradient is back with its
owner. The query gradient stays local.

Nothing of size ``[s, s]`` for the whole sequence exists anywhere; each rank
holds one other block at a time. Bytes each rank sends per attention call:
forward ``(cp - 1)`` blocks of keys and values, backward ``cp - 1`` blocks of
keys, values and their float32 gradients, and one of gradients alone.
:class:`RingTrace` records each step's compute and wait times, the chunk pairs
computed and the bytes sent (the chapter's timeline and work balance).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lessons_pkg.context_parallel.online_softmax import CAUSAL, FULL, block_attention, merge_partial_attention
from lessons_pkg.context_parallel.split import LAYOUTS, rank_chunks

def chunk_pairs(q_chunks, kv_chunks, causal: bool):
    """``(query slot, key slot, mask)`` for every pair of chunks that has work (causal: key chunk <= query chunk)."""
    for a, i in enumerate(q_chunks):
        for b, j in enumerate(kv_chunks):
            if not causal or j < i:
                yield a, b, FULL
            elif j == i:
                yield a, b, CAUSAL


@dataclass
class RingTrace:
    """What one rank did in ring attention while :func:`tracing` was on (times from ``time.perf_counter``)."""
    events: list[tuple[str, str, int, float, float]] = field(default_factory=list)  # (pass, kind, step, t0, t1)
    pairs: int = 0          # chunk pairs computed (forward)
    bytes_sent: int = 0

    def add(self, pass_: str, kind: str, step: int, t0: float) -> None:
        self.events.append((pass_, kind, step, t0, time.perf_counter()))


_TRACE: RingTrace | None = None


@contextmanager
def tracing(trace: RingTrace):
    """Record into ``trace`` what ring attention does inside the block."""
    global _TRACE
    previous, _TRACE = _TRACE, trace
    try:
        yield trace
    finally:
        _TRACE = previous


def _exchange(tensor: torch.Tensor, dst: int, src: int, group) -> tuple[list, torch.Tensor]:
    """Start sending ``tensor`` to global rank ``dst`` and receiving one like it from ``src``."""
    incoming = torch.empty_like(tensor)
    requests = [dist.isend(tensor.contiguous(), dst, group=group), dist.irecv(incoming, src, group=group)]
    if _TRACE is not None:
        _TRACE.bytes_sent += tensor.numel() * tensor.element_size()
    return requests, incoming


def _wait(requests: list, pass_: str, step: int) -> None:
    t0 = time.perf_counter()
    for request in requests:
        request.wait()
    if _TRACE is not None:
        _TRACE.add(pass_, "wait", step, t0)


def _block_grads(q, k, v, out, lse, dout, delta, mask):
    """Flash attention's backward for one block pair: ``(dq, dk, dv)`` in float32 from the final ``lse``."""
    scale = q.size(-1) ** -0.5
    q, k, v, dout = q.float(), k.float(), v.float(), dout.float()
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale                     # [b, nh, c, c]
    if mask == CAUSAL:
        c = scores.size(-1)
        scores = scores.masked_fill(torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1))                             # this block's share of the softmax
    dv = torch.matmul(probs.transpose(-1, -2), dout)                          # [b, nh, c, hd]
    dprobs = torch.matmul(dout, v.transpose(-1, -2))                          # [b, nh, c, c]
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    return torch.matmul(dscores, k) * scale, torch.matmul(dscores.transpose(-1, -2), q) * scale, dv


class _RingAttention(torch.autograd.Function):
    """Forward: ``(out, lse)`` with keys and values passed to the next rank. Backward: the key and value
    gradients accumulated round the ring the other way, the query gradient kept (see the module)."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout):
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        nxt, prv = dist.get_global_rank(group, (r + 1) % cp), dist.get_global_rank(group, (r - 1) % cp)
        c = q.size(2) // 2
        mine = rank_chunks(r, cp, layout)
        outs, lses = [None, None], [None, None]
        kv = torch.stack([k, v])                                              # [2, b, nh, 2c, hd]
        for step in range(cp):
            source = (r - step) % cp                                          # whose keys and values these are
            if step < cp - 1:
                requests, incoming = _exchange(kv, nxt, prv, group)           # the next block, while computing
            t0 = time.perf_counter()
            for a, b, mask in chunk_pairs(mine, rank_chunks(source, cp, layout), causal):
                out_b, lse_b = block_attention(q[:, :, a * c:(a + 1) * c], kv[0][:, :, b * c:(b + 1) * c],
                                               kv[1][:, :, b * c:(b + 1) * c], mask)
                if outs[a] is None:
                    outs[a], lses[a] = out_b, lse_b
                else:
                    outs[a], lses[a] = merge_partial_attention(outs[a], lses[a], out_b, lse_b)
                if _TRACE is not None:
                    _TRACE.pairs += 1
            if _TRACE is not None:
                _TRACE.add("forward", "compute", step, t0)
            if step < cp - 1:
                _wait(requests, "forward", step)
                kv = incoming
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)           # [b, nh, 2c, hd], [b, nh, 2c]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.layout = group, causal, layout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout = ctx.group, ctx.causal, ctx.layout
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        nxt, prv = dist.get_global_rank(group, (r + 1) % cp), dist.get_global_rank(group, (r - 1) % cp)
        c = q.size(2) // 2
        mine = rank_chunks(r, cp, layout)
        delta = (dout.float() * out.float()).sum(-1)                          # rowsum(dO * O): [b, nh, 2c]
        dq = torch.zeros_like(q, dtype=torch.float32)
        block = torch.stack([k.float(), v.float(), torch.zeros_like(k, dtype=torch.float32),
                             torch.zeros_like(v, dtype=torch.float32)])     # k, v, dk, dv: [4, b, nh, 2c, hd]
        for step in range(cp):
            source = (r + step) % cp                                          # the ring runs the other way
            t0 = time.perf_counter()
            for a, b, mask in chunk_pairs(mine, rank_chunks(source, cp, layout), causal):
                qs, ks = slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c)
                dq_a, dk_b, dv_b = _block_grads(q[:, :, qs], block[0][:, :, ks], block[1][:, :, ks],
                                                out[:, :, qs], lse[:, :, qs], dout[:, :, qs], delta[:, :, qs], mask)
                dq[:, :, qs] += dq_a
                block[2][:, :, ks] += dk_b
                block[3][:, :, ks] += dv_b
            if _TRACE is not None:
                _TRACE.add("backward", "compute", step, t0)
            # pass the block and its gradients so far to rank r - 1; the last step sends the gradients home
            send = block if step < cp - 1 else block[2:]
            requests, incoming = _exchange(send, prv, nxt, group)
            _wait(requests, "backward", step)
            block = incoming
        dk, dv = block[-2], block[-1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                   causal: bool = True, layout: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's ``q, k, v [b, nh, s/cp, hd]`` over the whole sequence: ``(out, lse)``.

    The local sequence is this rank's two chunks (:func:`rank_chunks` of ``layout``); ``out`` is
    ``[b, nh, s/cp, hd]`` in q's dtype, ``lse [b, nh, s/cp]`` float32 (not differentiable). On a group
    of one rank it is :func:`.online_softmax.full_attention`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if q.size(2) % 2:
        raise ValueError(f"ring attention takes two equal chunks per rank: local length {q.size(2)} is odd")
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return block_attention(q, k, v, CAUSAL if causal else FULL)
    return _RingAttention.apply(q, k, v, group, causal, layout)
