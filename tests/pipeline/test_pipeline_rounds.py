"""Communication rounds: grouping, deadlock freedom on the strictest transport, message order."""
import pytest

from lessons_pkg.pipeline.rounds import check_rounds, steps
from lessons_pkg.pipeline.schedules import (
    RECV_BACKWARD, RECV_FORWARD, SEND_FORWARD, gpipe, interleaved_one_f_one_b, one_f_one_b,
)


def all_schedules():
    for p in (1, 2, 3, 4, 8):
        for m in (1, 2, 3, 4, 5, 8, 16):
            yield gpipe(p, m)
            yield one_f_one_b(p, m)
            for v in (1, 2, 3):
                if m % p == 0:
                    yield interleaved_one_f_one_b(p, m, v)


@pytest.mark.parametrize("forward_only", [False, True])
def test_rounds_cannot_deadlock_even_with_rendezvous_messages(forward_only):
    for s in all_schedules():
        check_rounds(s, forward_only, headers=False)  # raises if some rank could wait forever
        if s.name != "interleaved":
            check_rounds(s, forward_only, headers=True)  # GPipe and 1F1B also with shape headers


def test_interleaved_with_headers_needs_known_shapes_on_strict_transports():
    # headers add a second batch per round; with interleaving a rank can then wait for a tensor whose
    # sender waits for it: why the executor asks for tensor_shape on NCCL
    with pytest.raises(RuntimeError, match="deadlocks with rendezvous messages"):
        check_rounds(interleaved_one_f_one_b(2, 4, 2), headers=True)


def test_rounds_without_megatron_pairing_would_deadlock():
    """Communicating around every single action is not enough for interleaved 1F1B: pairing matters."""
    s = interleaved_one_f_one_b(2, 4, 2)
    s.pair_steady = False
    with pytest.raises(RuntimeError, match="deadlocks with rendezvous messages"):
        check_rounds(s, headers=False)


def test_steps_of_1f1b_send_forward_recv_backward():
    rounds = steps(one_f_one_b(2, 2), 0)
    assert [[str(a) for a in r.compute] for r in rounds] == [["F0"], ["F1"], ["B0"], ["B1"], []]
    # after F1: send its output and receive the gradient for B0 in one round (Megatron's send_forward_recv_backward)
    assert [[(a.op, a.microbatch) for a in r.sends] for r in rounds] == [[], [(SEND_FORWARD, 0)], [(SEND_FORWARD, 1)], [], []]
    assert [[(a.op, a.microbatch) for a in r.recvs] for r in rounds] == [[], [], [(RECV_BACKWARD, 0)], [(RECV_BACKWARD, 1)], []]


def test_steps_of_interleaved_pair_steady_forward_with_backward():
    rounds = steps(interleaved_one_f_one_b(2, 4, 2), 0)
    blocks = [[str(a) for a in r.compute] for r in rounds]
    # rank 0: 2 (p - r - 1) + (v - 1) p = 4 warm-up forwards, then forward + backward blocks
    assert blocks[:7] == [["F0"], ["F1"], ["F0.1"], ["F1.1"], ["F2", "B0.1"], ["F3", "B1.1"], ["F2.1", "B0"]]
    # one round brings both the block's forward input (stage 1 -> 2) and its backward gradient (stage 1 -> 0)
    assert sorted((a.op, a.microbatch, a.chunk) for a in rounds[6].recvs) == [(RECV_BACKWARD, 0, 0), (RECV_FORWARD, 2, 1)]


@pytest.mark.parametrize("forward_only", [False, True])
def test_each_round_of_a_sender_is_one_round_of_its_receiver(forward_only):
    """Per directed pair, the messages a round sends are received together in one round of the peer.

    The channel posts a round's headers before its payloads; this property makes
    the receiver post them in the same order, which backends that match
    messages by order alone (NCCL) need.
    """
    for s in all_schedules():
        sent, received = {}, {}
        for r in range(s.num_stages):
            for step in steps(s, r, forward_only):
                out, into = {}, {}
                for a in step.sends:
                    out.setdefault(a.peer, []).append((a.op[-1], a.microbatch, s.virtual_stage(r, a.chunk)))
                for a in step.recvs:
                    stage = s.virtual_stage(r, a.chunk)
                    into.setdefault(a.peer, []).append((a.op[-1], a.microbatch, stage - 1 if a.op == RECV_FORWARD else stage + 1))
                for peer, msgs in out.items():
                    sent.setdefault((r, peer), []).append(sorted(msgs))
                for peer, msgs in into.items():
                    received.setdefault((peer, r), []).append(sorted(msgs))
        assert sent == received, (s.name, s.num_stages, s.num_microbatches, s.num_chunks)
