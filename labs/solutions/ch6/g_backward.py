"""Solution ch6.1. y = sum_r partial_r, so dy/dpartial_r = 1: every rank's partial gets dy unchanged.
(All-reducing here would multiply every gradient by tp: the checker shows the ratio.)"""
import torch
import torch.distributed as dist


class G(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None
