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

Sends are asynchronous (``isend``: the :class:`Channel` keeps each tensor
until it is delivered); receives block. A rank therefore only ever waits for
data it needs next, and a schedule whose orders respect the data
dependencies (checked by ``schedules.simulate``) cannot deadlock.
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
    """This rank's end of the pipeline's messages: asynchronous sends, blocking receives.

    ``dst``/``src`` are global ranks. A message to oneself (a pipeline of one
    rank with several chunks) is handed over in memory.
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.me = dist.get_rank()
        self.pending: list = []  # (work, tensor) of sends in flight: the tensor must live until sent
        self.local: dict[int, torch.Tensor] = {}  # message id -> tensor sent to oneself

    def send(self, tensor: torch.Tensor, dst: int, message_id: int) -> None:
        payload = tensor.detach().contiguous()
        self.pending = [h for h in self.pending if not h[0].is_completed()]  # free what was delivered
        if dst == self.me:
            self.local[message_id] = payload
            return
        header = _header(message_id, payload)
        for t in (header, payload):
            self.pending.append((dist.isend(t, dst, group=self.group), t))

    def recv(self, src: int, message_id: int) -> torch.Tensor:
        if src == self.me:
            return self.local.pop(message_id).clone()
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.irecv(header, src, group=self.group).wait()
        got_id, dtype_code, ndim, *sizes = header.tolist()
        if got_id != message_id:
            raise RuntimeError(
                f"rank {self.me} expected message {describe(message_id)} from rank {src} "
                f"but received {describe(got_id)}: the schedules of the two ranks do not pair up"
            )
        tensor = torch.empty(sizes[:ndim], dtype=_DTYPES[dtype_code], device=self.device)
        dist.irecv(tensor, src, group=self.group).wait()
        return tensor

    def wait_all(self) -> None:
        for work, _tensor in self.pending:
            work.wait()
        self.pending.clear()


# --- message ids -------------------------------------------------------------
def message_id(kind: str, microbatch: int, stage: int) -> int:
    """Id of the activation (kind 'act') or gradient ('grad') that virtual ``stage`` sends for ``microbatch``."""
    return (microbatch * 2**20 + stage) * 2 + {"act": 0, "grad": 1}[kind]


def describe(mid: int) -> str:
    kind = "activation" if mid % 2 == 0 else "gradient"
    microbatch, stage = divmod(mid // 2, 2**20)
    return f"<{kind} of microbatch {microbatch} from virtual stage {stage}>"
