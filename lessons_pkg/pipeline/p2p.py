"""Point-to-point messages between pipeline stages: any tensor, with a small header.

A stage need not know in advance the shape of the activation its neighbour
sends (sequence lengths may vary, the dtype may be anything), so an
activation travels as two sends on the pipeline group:

    header   int64[10] = [message id, dtype code, ndim, size_0, ..., size_6]   (unused sizes are 0)
    payload  the tensor itself, contiguous

The receiver reads the header, allocates the tensor and receives the payload.
The message id (activation or gradient, microbatch, stage) is checked on
arrival, so two schedules that do not pair up fail with an error that names
both messages instead of silently training on the wrong microbatch. A
gradient needs no header: it has the shape and dtype of the activation the
receiver sent. When the caller gives the activation shape (Megatron's
``tensor_shape``), no header travels at all.

Messages travel in rounds (``rounds.steps``): the sends of one compute
block and the receives of the next are posted together, as Megatron-LM does.
``rounds.check_rounds`` proves, for a schedule, that these rounds cannot
deadlock even when a send completes only once its receive is posted and
batches complete as a whole (NCCL). It holds for GPipe and 1F1B with or
without headers, and for interleaved 1F1B only without headers: the executor
asks for ``tensor_shape`` in that case on backends other than gloo.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool, torch.uint8]
_MAX_DIMS = 7
_HEADER_LEN = 3 + _MAX_DIMS


def _header(message_id: int, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"cannot send a tensor of dtype {tensor.dtype}; supported: {_DTYPES}")
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"cannot send a tensor of {tensor.dim()} dimensions (at most {_MAX_DIMS})")
    sizes = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
    values = [message_id, _DTYPES.index(tensor.dtype), tensor.dim(), *sizes]
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


class Channel:
    """This rank's end of the pipeline's messages, exchanged in rounds.

    ``exchange(sends, recvs)`` posts every send of a round (headers and
    tensors) with the receives it can already size, as one
    ``batch_isend_irecv``; once the headers have arrived it receives the
    tensors they announce, then waits until its own sends are delivered.
    Between two ranks, the messages of one round of the sender are received in
    one round of the receiver (``tests/pipeline`` checks this for every
    schedule), so both post them in the same order. Peers are global ranks;
    a message to oneself (a one-rank pipeline with several chunks) is handed
    over in memory.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.me = dist.get_rank()
        self.local: dict[int, torch.Tensor] = {}  # message id -> tensor sent to oneself

    def exchange(self, sends: list[tuple[torch.Tensor, int, int, bool]],
                 recvs: list[tuple[int, int, tuple | None]]) -> dict[int, torch.Tensor]:
        """One round of messages; return ``{message_id: received tensor}``.

        sends   ``(tensor, dst, message_id, with_header)``
        recvs   ``(src, message_id, like)``: ``like = (shape, dtype)`` when the
                receiver knows what arrives (no header travels), None when a
                header announces it
        """
        received = {}
        for tensor, dst, mid, _ in sends:
            if dst == self.me:
                self.local[mid] = tensor.detach().clone()
        for src, mid, _ in recvs:
            if src == self.me:
                received[mid] = self.local.pop(mid)
        sends = sorted((dst, mid, t.detach().contiguous(), h) for t, dst, mid, h in sends if dst != self.me)
        recvs = sorted((src, mid, like) for src, mid, like in recvs if src != self.me)
        if not sends and not recvs:
            return received

        # batch 1: everything we send, and what we receive that we can size: tensors of known shape, headers.
        # Per peer, both sides order the messages alike (so they pair up even where matching is by order
        # alone, as in NCCL, which ignores tags): headers, tensors without header, announced tensors,
        # each group in (peer, message id) order.
        outgoing = ([(_header(mid, t), dst) for dst, mid, t, h in sends if h]
                    + [(t, dst) for dst, _, t, h in sends if not h] + [(t, dst) for dst, _, t, h in sends if h])
        known = [(src, mid, torch.empty(like[0], dtype=like[1], device=self.device)) for src, mid, like in recvs if like]
        announced = [(src, mid, torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device))
                     for src, mid, like in recvs if like is None]
        send_works, header_works = self._post(outgoing, [(h, src) for src, _, h in announced] + [(b, src) for src, _, b in known])
        _wait(header_works)  # (with per-operation works, the sends may still be in flight)
        received.update((mid, b) for _, mid, b in known)
        # batch 2: the tensors announced by headers
        buffers = []
        for src, mid, header in announced:
            got_id, dtype_code, ndim, *sizes = header.tolist()
            if got_id != mid:
                raise RuntimeError(
                    f"rank {self.me} expected message {describe(mid)} from rank {src} "
                    f"but received {describe(got_id)}: the schedules of the two ranks do not pair up"
                )
            buffers.append((src, mid, torch.empty(sizes[:ndim], dtype=_DTYPES[dtype_code], device=self.device)))
        _, payload_works = self._post([], [(b, src) for src, _, b in buffers])
        _wait(payload_works)
        _wait(send_works)  # our tensors may be freed or reused once delivered
        received.update((mid, b) for _, mid, b in buffers)
        return received

    def _post(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> tuple[list, list]:
        """Post sends and receives as one batch; return (send works, receive works).

        Backends that coalesce a batch into one operation (NCCL) return one
        work for all: it is then in both lists, and waiting on it waits for all.
        """
        ops = [dist.P2POp(dist.isend, t, dst, self.group) for t, dst in sends]
        ops += [dist.P2POp(dist.irecv, t, src, self.group) for t, src in recvs]
        if not ops:
            return [], []
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):
            return works, works
        return works[:len(sends)], works[len(sends):]


def _wait(works: list) -> None:
    for work in works:
        work.wait()


# --- message ids -------------------------------------------------------------
def message_id(kind: str, microbatch: int, stage: int) -> int:
    """Id of the activation (kind 'act') or gradient ('grad') that virtual ``stage`` sends for ``microbatch``."""
    return (microbatch * 2**20 + stage) * 2 + {"act": 0, "grad": 1}[kind]


def describe(mid: int) -> str:
    kind = "activation" if mid % 2 == 0 else "gradient"
    microbatch, stage = divmod(mid // 2, 2**20)
    return f"<{kind} of microbatch {microbatch} from virtual stage {stage}>"
