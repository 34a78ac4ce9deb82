"""Check the fused kernels against their float64 references: ``python -m lessons_pkg.kernels.check``.

For each op, fresh random float32 inputs (odd sizes, a fully masked softmax
row) go through the kernel and, as float64, through the plain PyTorch
reference; the output and the gradient of every input are compared. Prints
one verification line per op and exits non-zero if any differs by more than
the bound (float32 rounding, ~10x its epsilon on values of O(1..10); the
LayerNorm bound is relative to the row's scale).
"""
from __future__ import annotations

import sys

import torch

from lessons_pkg import kernels
from lessons_pkg.kernels import reference
from lessons_pkg.utils import largest, max_abs_error, within

BOUND = 1e-5


def _max_errors(kernel, ref, inputs, grad_seed=1):
    """|kernel - reference| (largest) for the output and each input gradient; inf where any value is NaN/inf."""
    k_in = [t.float().detach().requires_grad_(t.requires_grad) for t in inputs]
    r_in = [t.float().double().detach().requires_grad_(t.requires_grad) for t in inputs]
    out, ref_out = kernel(*k_in), ref(*r_in)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    leaves = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads = torch.autograd.grad(out, [k_in[i] for i in leaves], g.float())
    ref_grads = torch.autograd.grad(ref_out, [r_in[i] for i in leaves], g)
    errors = [max_abs_error(out, ref_out)]
    errors += [max_abs_error(a, b) for a, b in zip(grads, ref_grads)]
    return errors


def cases(seed: int = 0, device: str = "cpu"):
    """(name, kernel, reference, inputs): the ops on fresh random inputs of odd sizes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_(grad)

    mask = torch.rand(3, 1, 37, 77, generator=g) < 0.3
    mask[1, 0, 5] = True  # a query that may attend to nothing: its row is zeros
    mask = mask.to(device)
    return [
        ("bias_gelu", kernels.bias_gelu, reference.bias_gelu, [rand(129, 301), rand(301)]),
        ("scaled_masked_softmax",
         lambda x: kernels.scaled_masked_softmax(x, mask, 0.125),
         lambda x: reference.scaled_masked_softmax(x, mask, 0.125), [rand(3, 4, 37, 77) * 4]),
        ("scaled_upper_triang_masked_softmax",
         lambda x: kernels.scaled_upper_triang_masked_softmax(x, 0.125),
         lambda x: reference.scaled_upper_triang_masked_softmax(x, 0.125), [rand(12, 65, 65) * 4]),
        ("layer_norm",
         lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
         lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), [rand(97, 515), rand(515), rand(515)]),
    ]


def main(case_list=None) -> int:
    ok = True
    for name, kernel, ref, inputs in case_list or cases():
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        errors = _max_errors(kernel, ref, inputs)
        good = within(largest(errors), BOUND)
        ok &= good
        print(f"{name}: output and {len(errors) - 1} input gradient(s) match the float64 reference "
              f"(max error <= {BOUND:g}): {good}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
