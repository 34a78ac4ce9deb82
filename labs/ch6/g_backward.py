"""Exercise ch6.1: the backward of g.

Megatron's MLP on tp ranks:  y = g( GeLU(f(x) W1_r^T + b1_r) W2_r^T ) + b2
where rank r holds rows of W1 and the matching columns of W2. g's forward
all-reduces (sums) the ranks' partial outputs. Its backward is yours: what
gradient does each rank's partial output receive, given the gradient of y?

The checker runs this MLP on 2 ranks with your g (and the course's f) and
compares the output and every gradient with one process (float64).

Check: python -m lessons_pkg.labs check ch6.1
"""
import torch
import torch.distributed as dist


class G(torch.autograd.Function):
    """g: forward all-reduce (sum over the tensor-parallel group), backward: ?"""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()          # the caller's partial sum stays as it was
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # return (gradient for x, None for group)
        raise NotImplementedError("G.backward")
