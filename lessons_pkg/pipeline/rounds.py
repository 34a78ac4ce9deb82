"""Communication rounds: when a rank exchanges messages with its neighbours, and why it cannot deadlock.

A schedule (``schedules.py``) orders a rank's forwards and backwards; every
forward but the first stage's needs an activation from the previous stage,
every backward but the last stage's a gradient from the next. How the
messages are posted decides whether the pipeline can hang. Blocking sends
in program order deadlock on 1F1B: rank r sends an activation to r+1 while
r+1 sends a gradient to r, and each waits for the other to receive.

Megatron-LM's answer, followed here: post a rank's sends and receives of one
moment together (``batch_isend_irecv``), so the peer's matching batch can
complete them. :func:`steps` cuts a rank's actions into such rounds, and
:func:`check_rounds` plays every rank's rounds against the strictest
transport to prove that no rank can wait forever.
"""
from __future__ import annotations

from dataclasses import dataclass

from lessons_pkg.pipeline.schedules import (
    BACKWARD, FORWARD, RECV_BACKWARD, RECV_FORWARD, SEND_BACKWARD, SEND_FORWARD, Action, Schedule,
)


@dataclass
class Step:
    """One round of messages, exchanged together, then the compute they make possible.

    ``recvs`` are the inputs of ``compute`` (activations from the previous
    stage, gradients from the next); ``sends`` are the outputs of the
    previous step's compute.
    """

    sends: list[Action]
    recvs: list[Action]
    compute: list[Action]


def steps(schedule: Schedule, rank: int, forward_only: bool = False) -> list[Step]:
    """Rank ``rank``'s actions grouped into rounds of communication and compute, as Megatron-LM groups them.

    Each round posts the sends of the previous compute and the receives of the
    next compute together (``batch_isend_irecv``): after a forward, 1F1B sends
    its output and receives the gradient for its next backward in one round
    (Megatron's ``send_forward_recv_backward``). Posting a send together with
    the receive that the peer's matching round waits for is what keeps a
    pipeline from deadlocking when a send completes only once the receiver has
    posted its receive (NCCL with large messages). For the interleaved
    schedule that is not enough: there a steady-state forward and the backward
    after it form one compute block, whose round receives both the forward's
    input and the backward's gradient, as in Megatron's interleaved schedule.
    :func:`check_rounds` proves a schedule's rounds deadlock-free. The last
    step has no compute: it sends the last outputs.
    """
    actions = [a for a in schedule.actions[rank] if a.op == FORWARD or not forward_only]
    blocks, i = [], 0
    while i < len(actions):
        pair = (schedule.pair_steady and not forward_only and actions[i].op == FORWARD and actions[i].phase == "steady"
                and i + 1 < len(actions) and actions[i + 1].op == BACKWARD)
        blocks.append(actions[i:i + 2] if pair else actions[i:i + 1])
        i += 2 if pair else 1
    messages = schedule.with_communication(rank)
    by_compute = {}  # compute action -> (receives before it, sends after it)
    for k, a in enumerate(messages):
        if a.op in (FORWARD, BACKWARD):
            before = [m for m in messages[max(0, k - 1):k] if m.op in (RECV_FORWARD, RECV_BACKWARD)]
            after = [m for m in messages[k + 1:k + 2] if m.op in (SEND_FORWARD, SEND_BACKWARD)]
            by_compute[(a.op, a.microbatch, a.chunk)] = (before, after)
    result, pending = [], []
    for block in blocks:
        recvs = [m for a in block for m in by_compute[(a.op, a.microbatch, a.chunk)][0]]
        result.append(Step(pending, recvs, block))
        pending = [m for a in block for m in by_compute[(a.op, a.microbatch, a.chunk)][1]]
    result.append(Step(pending, [], []))
    return result


def check_rounds(schedule: Schedule, forward_only: bool = False, headers: bool = True) -> None:
    """Raise ``RuntimeError`` if the rounds of :func:`steps` can deadlock, even on the strictest transport.

    The strictest transport (NCCL with large messages and grouped operations):
    a message completes only when its sender's and its receiver's current
    batches both contain it, and a rank posts its next batch only when every
    message of the current one has completed. With ``headers`` (activations
    of unknown shape, see ``p2p.Channel``), a round is two batches: first
    every send (header and tensor), the gradients and the activation headers
    it receives; then the activation tensors it receives.
    """
    p = schedule.num_stages
    batches = [[b for st in steps(schedule, r, forward_only) for b in _round_batches(schedule, r, st, headers)]
               for r in range(p)]
    at, completed = [0] * p, set()
    while any(at[r] < len(batches[r]) for r in range(p)):
        posted: dict[tuple, set] = {}
        for r in range(p):
            if at[r] < len(batches[r]):
                for side, message in batches[r][at[r]]:
                    posted.setdefault(message, set()).add(side)
        completed |= {msg for msg, sides in posted.items() if sides == {"send", "recv"}}
        advanced = False
        for r in range(p):
            if at[r] < len(batches[r]) and all(msg in completed for _, msg in batches[r][at[r]]):
                at[r] += 1
                advanced = True
        if not advanced:
            stuck = {r: at[r] for r in range(p) if at[r] < len(batches[r])}
            raise RuntimeError(f"schedule '{schedule.name}' deadlocks with rendezvous messages: ranks stuck at batches {stuck}")


def _round_batches(schedule: Schedule, rank: int, step: Step, headers: bool) -> list[list[tuple[str, tuple]]]:
    """A round's batches of (side, (part, kind, microbatch, sending virtual stage)); messages to oneself need no partner."""
    first, second = [], []
    for a in step.sends + step.recvs:
        if a.peer == rank:
            continue
        stage = schedule.virtual_stage(rank, a.chunk)
        side = "send" if a.op in (SEND_FORWARD, SEND_BACKWARD) else "recv"
        kind = "act" if a.op in (SEND_FORWARD, RECV_FORWARD) else "grad"
        sender = {SEND_FORWARD: stage, SEND_BACKWARD: stage, RECV_FORWARD: stage - 1, RECV_BACKWARD: stage + 1}[a.op]
        if kind == "act" and headers:
            first.append((side, ("header", kind, a.microbatch, sender)))
            (first if side == "send" else second).append((side, ("tensor", kind, a.microbatch, sender)))
        else:
            first.append((side, ("tensor", kind, a.microbatch, sender)))
    return [b for b in (first, second) if b]
