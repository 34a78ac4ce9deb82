"""Helpers shared by the kernel tests: poisoned allocations and reference comparisons."""
from __future__ import annotations

import contextlib

import pytest
import torch

NO_CUDA = "no CUDA device: the CUDA kernels are compiled (test_kernels_build.py) but cannot run here"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


@contextlib.contextmanager
def poisoned_outputs():
    """Every tensor allocated with ``empty`` inside is filled with NaN first (PyTorch's own switch:
    deterministic algorithms + ``fill_uninitialized_memory``), so an output element that a kernel
    forgets to write is NaN and fails the comparison instead of passing by luck with stale memory."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        canary = torch.empty(33)
        assert canary.isnan().all(), "poisoning is not active: torch.empty did not return NaN"
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def run_with_grads(fn, inputs, grad_out_seed=1234):
    """``fn(*inputs)`` and the gradients of every floating input that requires grad,
    for a fixed random upstream gradient. Returns ``(output, [grads])``."""
    out = fn(*inputs)
    g = torch.Generator(device="cpu").manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, list(grads)


def leaf(t: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """A detached copy that requires grad (in ``dtype`` / on ``device`` if given)."""
    return t.detach().to(device=device or t.device, dtype=dtype or t.dtype).clone().requires_grad_(True)


def assert_close_to_reference(kernel, reference, inputs, *, atol, rtol, what, device="cpu", dtype=torch.float32,
                              baseline=None):
    """Run ``kernel`` on ``inputs`` cast to ``dtype`` (outputs poisoned) and ``reference`` in float64 on CPU
    on the same (rounded) values; compare the output and every input gradient.

    Without ``baseline``: ``|kernel - reference| <= atol + rtol * |reference|`` elementwise.
    With ``baseline`` (plain PyTorch run in the kernel's dtype and device), flash-attention's rule:
    the kernel's largest error may be at most twice PyTorch's own largest error in that dtype, plus ``atol``.
    """
    floating = [isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad for t in inputs]
    k_in = [leaf(t, dtype, device) if f else (t.to(device) if isinstance(t, torch.Tensor) else t)
            for t, f in zip(inputs, floating)]
    # the reference sees exactly the values the kernel sees (rounded to dtype), then computes in float64
    r_in = [leaf(t.detach().to(dtype), torch.float64, "cpu") if f else t for t, f in zip(inputs, floating)]
    with poisoned_outputs():
        out, grads = run_with_grads(kernel, k_in)
    ref, ref_grads = run_with_grads(reference, r_in)
    names = ["output"] + [f"grad of input {i}" for i in range(len(grads))]
    assert len(grads) == len(ref_grads)
    if baseline is None:
        for name, k, r in zip(names, [out, *grads], [ref, *ref_grads]):
            torch.testing.assert_close(k.double().cpu(), r, atol=atol, rtol=rtol, msg=lambda m: f"{what} {name}: {m}")
        return
    b_in = [leaf(t, dtype, device) if f else (t.to(device) if isinstance(t, torch.Tensor) else t)
            for t, f in zip(inputs, floating)]
    b_out, b_grads = run_with_grads(baseline, b_in)
    for name, k, b, r in zip(names, [out, *grads], [b_out, *b_grads], [ref, *ref_grads]):
        assert not k.isnan().any(), f"{what} {name}: NaN (an element left unwritten?)"
        err = (k.double().cpu() - r).abs().max().item()
        base = (b.double().cpu() - r).abs().max().item()
        assert err <= 2 * base + atol, f"{what} {name}: kernel error {err:.3g} > 2 x PyTorch's {base:.3g} + {atol:g}"
