"""Solution ch6.2. dL/dx = sum over ranks of each rank's partial gradient: all-reduce it.
Clone first: autograd may hand the same gradient tensor to other branches, and all_reduce works in place."""
import torch
import torch.distributed as dist


class F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
