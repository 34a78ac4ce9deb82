"""Exercise ch6b.2: the causal scaled softmax of attention, and its backward.

scores [b*heads, sq, sk]: softmax over the last dimension of scale * scores,
where key j > query i is masked (it must get probability 0). Subtract each
row's maximum before exp (large scores must not overflow).

The backward needs only the saved probabilities p (that is what the kernel
keeps): d softmax(scale * x) / dx applied to dy. The checker compares with
the course's reference and with autograd in float64.

Check: python -m lessons_pkg.labs check ch6b.2
"""
import torch


def scaled_causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    raise NotImplementedError("scaled_causal_softmax(scores, scale)")


def softmax_grad(dy: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    raise NotImplementedError("softmax_grad(dy, probs, scale)")
