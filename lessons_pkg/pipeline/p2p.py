"""Point-to-point messages between pipeline stages: any tensor, with a small header.

A stage does not know in advance what its neighbour sends (token ids on the
first stage, ``[batch, seq, hidden]`` float activations later, any dtype), so
every message travels as two sends on the pipeline group:

    header   int64[10] = [message id, dtype code, ndim, size_0, ..., size_6]   (unused sizes are 0)
    payload  the tensor itself, contiguous

The receiver reads the header, allocates the tensor and receives the payload.
The message id (who sent what: activation or gradient, microbatch, stage) is
checked on arrival, so a schedule whose sends and receives do not pair up in
order fails with an error that names both messages instead of silently
training on the wrong microbatch.

Messages travel in rounds (``schedules.steps``): the sends of one compute
block and the receives of the next are posted together and waited for
together, as Megatron-LM does. ``schedules.check_rounds`` proves, for any
schedule, that these rounds cannot deadlock even when a send completes only
once its receive is posted.
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

    ``exchange(sends, recvs)`` posts every send of a round (header and
    payload) and the receives of the headers together with
    ``batch_isend_irecv``; once the headers have arrived it receives the
    payloads, then waits until its own sends are delivered. A rank never waits
    for a send before its receives are posted, so two neighbours that send to
    each other in the same round cannot block each other. Between two ranks,
    the messages of one round of the sender are received in one round of the
    receiver (``tests/pipeline`` checks this for every schedule), so the order
    headers-then-payloads is the same on both sides. Within a round,
    messages to and from each peer are posted in message-id order on both
    sides, so they pair up even on backends that match messages by order
    alone (NCCL ignores tags). Peers are global ranks; a message to oneself
    (a one-rank pipeline with several chunks) is handed over in memory.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.me = dist.get_rank()
        self.local: dict[int, torch.Tensor] = {}  # message id -> tensor sent to oneself

    def exchange(self, sends: list[tuple[torch.Tensor, int, int]], recvs: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
        """Send each ``(tensor, dst, message_id)``, receive each ``(src, message_id)``; return ``{message_id: tensor}``."""
        received = {}
        for tensor, dst, mid in sends:
            if dst == self.me:
                self.local[mid] = tensor.detach().clone()
        for src, mid in recvs:
            if src == self.me:
                received[mid] = self.local.pop(mid)
        sends = sorted(((dst, mid, t.detach().contiguous()) for t, dst, mid in sends if dst != self.me), key=lambda s: s[:2])
        recvs = sorted((src, mid) for src, mid in recvs if src != self.me)
        if not sends and not recvs:
            return received

        # phase 1: every header and every payload goes out; the headers say what to allocate
        # all headers before all payloads, each in (peer, message id) order: the receiver posts its
        # receives in the same order, so messages pair up even where matching is by order alone
        outgoing = [(_header(mid, t), dst) for dst, mid, t in sends] + [(t, dst) for dst, _, t in sends]
        headers = [torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device) for _ in recvs]
        send_works, header_works = self._post(outgoing, [(h, src) for h, (src, _) in zip(headers, recvs)])
        _wait(header_works)
        buffers = []
        for header, (src, mid) in zip(headers, recvs):
            got_id, dtype_code, ndim, *sizes = header.tolist()
            if got_id != mid:
                raise RuntimeError(
                    f"rank {self.me} expected message {describe(mid)} from rank {src} "
                    f"but received {describe(got_id)}: the schedules of the two ranks do not pair up"
                )
            buffers.append(torch.empty(sizes[:ndim], dtype=_DTYPES[dtype_code], device=self.device))
        # phase 2: receive the payloads, then make sure our own sends are delivered
        _, payload_works = self._post([], [(b, src) for b, (src, _) in zip(buffers, recvs)])
        _wait(payload_works)
        _wait(send_works)
        received.update((mid, b) for b, (_, mid) in zip(buffers, recvs))
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
