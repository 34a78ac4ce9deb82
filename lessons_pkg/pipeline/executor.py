"""Run a pipeline schedule: forwards, backwards and the messages between stages.

    losses = forward_backward(modules, "1f1b", microbatches, targets, loss_fn)

Every rank of the pipeline calls this with its own model chunks; the schedule
(see ``schedules.py``) says in which order this rank runs the forward and
backward of each (microbatch, chunk), and ``rounds.steps`` groups them into
rounds: exchange messages with the neighbours, then compute. For each
action the executor

    F(i, c):  input  = microbatches[i] on virtual stage 0, else receive it from the previous stage
              output = modules[c](input)
              last virtual stage: loss_i = loss_fn(output, targets[i]); else send output to the next stage
    B(i, c):  last virtual stage: backward of loss_i / m
              else receive d loss / d output from the next stage, backward through this chunk
              virtual stage > 0: send d loss / d input to the previous stage

The received input is a fresh leaf tensor with ``requires_grad=True``: that
is where the autograd graph of a stage begins, and its ``.grad`` after the
backward is exactly what the previous stage needs. Dividing each loss by ``m``
leaves in every ``.grad`` the gradient of the mean microbatch loss, what one
big batch would give. Gradients accumulate in ``.grad`` (zero them before).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from lessons_pkg.pipeline import p2p
from lessons_pkg.pipeline.rounds import check_rounds, steps
from lessons_pkg.pipeline.schedules import BACKWARD, FORWARD, RECV_FORWARD, Schedule, get_schedule


def forward_backward(
    modules: Sequence[nn.Module],
    schedule: str | Schedule,
    microbatches: Sequence[torch.Tensor] | None,
    targets: Sequence[torch.Tensor] | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None = None,
    num_microbatches: int | None = None,
    recorder=None,
    forward_only: bool = False,
    tensor_shape: Sequence[int] | None = None,
    tensor_dtype: torch.dtype | None = None,
) -> list[torch.Tensor] | None:
    """Forward and backward of all microbatches through the pipeline; return the last stage's losses.

    modules          this rank's model chunks: 1 for 'gpipe' and '1f1b', v for 'interleaved'
                     (chunk c of pipeline rank r is virtual stage c * p + r)
    schedule         'gpipe' | '1f1b' | 'interleaved', or a :class:`Schedule`
    microbatches     inputs, read on the first stage (may be None elsewhere)
    targets          targets, read on the last stage (may be None elsewhere)
    loss_fn          ``loss_fn(output, target)`` -> scalar, on the last stage
    group            the pipeline group (default: ``parallel_state``'s); its rank order is the stage order
    num_microbatches m; needed only where neither microbatches nor targets are given
    recorder         optional ``timeline.Recorder`` that timestamps every forward and backward
    forward_only     run only the forwards, without autograd (evaluation): the losses, no gradients
    tensor_shape     shape of every activation between stages, e.g. ``(b, s, h)``, if known: then no
                     header travels with it (Megatron's ``tensor_shape``). Needed for the interleaved
                     schedule on backends other than gloo (``rounds.check_rounds`` says why)
    tensor_dtype     dtype of those activations (default: that of this rank's parameters)

    Returns the detached loss of every microbatch on the last stage, None on the others.
    """
    if group is None:
        from lessons_pkg import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    ranks = dist.get_process_group_ranks(group)  # global ranks, stage order
    modules = list(modules)
    m = _num_microbatches(microbatches, targets, num_microbatches)
    if isinstance(schedule, str):
        schedule = get_schedule(schedule, p, m, len(modules) if schedule == "interleaved" else 1)
    _check(schedule, modules, p, m)
    last = schedule.num_virtual_stages - 1
    device = _device_of(modules)
    if tensor_shape is None and dist.get_backend(group) != "gloo":
        try:
            check_rounds(schedule, forward_only, headers=True)
        except RuntimeError as e:
            raise ValueError(f"{e}: on the {dist.get_backend(group)} backend pass tensor_shape= "
                             "(the shape of the activations between stages) so that no header travels") from e
    like = None if tensor_shape is None else (tuple(tensor_shape), tensor_dtype or _dtype_of(modules))
    run = _Run(modules, microbatches, targets, loss_fn, m, last, ranks, rank, recorder, like)
    channel = p2p.Channel(group, device)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not forward_only):
        for step in steps(schedule, rank, forward_only):
            # one round of messages: the previous block's outputs out, this block's inputs in
            run.inbox.update(channel.exchange(run.outbox, [run.expect(a) for a in step.recvs]))
            run.outbox = []
            for action in step.compute:
                if action.op == FORWARD:
                    run.forward(action.microbatch, action.chunk, keep_for_backward=not forward_only)
                else:
                    run.backward(action.microbatch, action.chunk)
    return run.losses if rank == p - 1 else None  # the last virtual stage p*v - 1 lives on rank p - 1


class _Run:
    """The state of one call: what each forward keeps for its backward, the messages in and out, the losses."""

    def __init__(self, modules, microbatches, targets, loss_fn, m, last, ranks, rank, recorder, activation_like):
        self.modules, self.microbatches, self.targets, self.loss_fn = modules, microbatches, targets, loss_fn
        self.m, self.last, self.recorder = m, last, recorder
        self.p, self.rank = len(ranks), rank
        self.prev, self.next = ranks[(rank - 1) % self.p], ranks[(rank + 1) % self.p]  # global ranks
        self.saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (microbatch, chunk) -> (input, output or loss)
        self.inbox: dict[int, torch.Tensor] = {}  # message id -> tensor received for this block
        self.outbox: list[tuple[torch.Tensor, int, int, bool]] = []  # (tensor, dst, message id, with header)
        self.activation_like = activation_like  # (shape, dtype) of received activations, None: announced by a header
        self.sent_like: dict[int, tuple] = {}  # message id of a gradient to come -> (shape, dtype) of our activation
        self.losses: list[torch.Tensor | None] = [None] * m

    def expect(self, recv) -> tuple[int, int, tuple | None]:
        """(source, message id, (shape, dtype) or None) of the message a RECV action waits for."""
        stage = recv.chunk * self.p + self.rank
        if recv.op == RECV_FORWARD:
            return self.prev, p2p.message_id("act", recv.microbatch, stage - 1), self.activation_like
        mid = p2p.message_id("grad", recv.microbatch, stage + 1)
        return self.next, mid, self.sent_like.pop(mid)  # the gradient of what we sent: same shape and dtype

    def forward(self, i: int, c: int, keep_for_backward: bool) -> None:
        stage = c * self.p + self.rank
        if stage == 0:
            x = self.microbatches[i]
        else:
            x = self.inbox.pop(p2p.message_id("act", i, stage - 1))
            x.requires_grad_(keep_for_backward and x.is_floating_point())  # the graph of this chunk starts here
        with _timed(self.recorder, FORWARD, i, c, x.device):
            y = self.modules[c](x)
            if stage == self.last:
                y = self.loss_fn(y, self.targets[i])
                self.losses[i] = y.detach()
        if stage != self.last:
            if self.activation_like is not None:  # no header: the receiver sizes its buffer from tensor_shape
                y = _as_announced(y, *self.activation_like, stage)
            self.outbox.append((y, self.next, p2p.message_id("act", i, stage), self.activation_like is None))
            if keep_for_backward:
                self.sent_like[p2p.message_id("grad", i, stage + 1)] = (tuple(y.shape), y.dtype)
        if keep_for_backward:
            self.saved[(i, c)] = (x, y)

    def backward(self, i: int, c: int) -> None:
        stage = c * self.p + self.rank
        x, y = self.saved.pop((i, c))
        if stage == self.last:
            grad_y = None
            y = y / self.m  # the gradient of the mean of the m microbatch losses
        else:
            grad_y = self.inbox.pop(p2p.message_id("grad", i, stage + 1))
        with _timed(self.recorder, BACKWARD, i, c, y.device):
            torch.autograd.backward(y, grad_y)
        if stage != 0:
            grad_x = x.grad if x.grad is not None else torch.zeros_like(x)  # an input the chunk did not use
            self.outbox.append((grad_x, self.prev, p2p.message_id("grad", i, stage), False))


def _as_announced(y: torch.Tensor, shape: tuple, dtype: torch.dtype, stage: int) -> torch.Tensor:
    """``y`` in the dtype the receiver expects (autocast may give bf16); a shape that differs is an error."""
    if tuple(y.shape) != shape:
        raise ValueError(f"stage {stage} produced an activation of shape {tuple(y.shape)}, but tensor_shape "
                         f"says {shape}: the next stage would receive the wrong number of elements")
    return y if y.dtype == dtype else y.to(dtype)  # differentiable: its gradient comes back in y's dtype


def _num_microbatches(microbatches, targets, num_microbatches) -> int:
    for given in (microbatches, targets):
        if given is not None:
            if num_microbatches is not None and num_microbatches != len(given):
                raise ValueError(f"num_microbatches ({num_microbatches}) != number of microbatches given ({len(given)})")
            return len(given)
    if num_microbatches is None:
        raise ValueError("give microbatches, targets or num_microbatches: this rank cannot know m otherwise")
    return num_microbatches


def _check(schedule: Schedule, modules: list, p: int, m: int) -> None:
    if schedule.num_stages != p:
        raise ValueError(f"schedule '{schedule.name}' is for {schedule.num_stages} stages but the pipeline group has {p} ranks")
    if schedule.num_microbatches != m:
        raise ValueError(f"schedule '{schedule.name}' is for {schedule.num_microbatches} microbatches but {m} were given")
    if len(modules) != schedule.num_chunks:
        raise ValueError(
            f"schedule '{schedule.name}' runs {schedule.num_chunks} model chunk(s) per rank "
            f"but this rank was given {len(modules)} module(s)"
        )


def _dtype_of(modules: list) -> torch.dtype:
    for module in modules:
        for param in module.parameters():
            return param.dtype
    return torch.get_default_dtype()


def _device_of(modules: list) -> torch.device:
    for module in modules:
        for param in module.parameters():
            return param.device
    return torch.device("cpu")


class _timed:
    """Context manager that reports (op, microbatch, chunk, start, end) to a recorder, if there is one."""

    def __init__(self, recorder, op: str, microbatch: int, chunk: int, device: torch.device):
        self.recorder, self.what, self.cuda = recorder, (op, microbatch, chunk), device.type == "cuda"

    def __enter__(self):
        if self.recorder is not None:
            if self.cuda:
                torch.cuda.synchronize()  # time the kernels, not their launch
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.recorder is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.recorder.record(*self.what, self.start, time.perf_counter())


def serial_forward_backward(
    layers: Sequence[nn.Module],
    microbatches: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """The reference: the whole model in one process, backward of the mean microbatch loss.

    What :func:`forward_backward` must reproduce, loss for loss and gradient for gradient.
    """
    losses = []
    for x, t in zip(microbatches, targets):
        for layer in layers:
            x = layer(x)
        losses.append(loss_fn(x, t))
    torch.stack(losses).mean().backward()
    return [loss.detach() for loss in losses]
