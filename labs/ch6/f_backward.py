"""Exercise ch6.2: the backward of f.

f sits where the replicated input x enters the column-parallel W1: its forward
is the identity (every rank already has x). Each rank's W1 rows see x, so
each rank computes only part of dL/dx. Write f's backward.

The checker runs Megatron's MLP on 2 ranks with your f (and the course's g)
and compares the output and every gradient with one process (float64).

Check: python -m lessons_pkg.labs check ch6.2
"""
import torch
import torch.distributed as dist


class F(torch.autograd.Function):
    """f: forward identity, backward: ?"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # return (gradient for x, None for group); ctx.group is the tensor-parallel group
        raise NotImplementedError("F.backward")
