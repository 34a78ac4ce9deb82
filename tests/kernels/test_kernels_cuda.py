"""The CUDA kernels against the float64 references, in float32, float16 and bfloat16 (GPU only).

Without a CUDA device every test here is skipped with that reason; the CUDA
sources are still compiled by test_kernels_build.py.

Tolerance (flash-attention's rule): the kernel's largest error against the
float64 reference may be at most twice the largest error of plain PyTorch
running the same steps in the same dtype on the same GPU, plus 4 ulp of the
dtype at 1.0: the kernels compute in float32 and round once, so they should
be at least as accurate as eager PyTorch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lessons_pkg import kernels
from lessons_pkg.kernels import reference
from kernels_testing import assert_close_to_reference, leaf, needs_cuda

pytestmark = needs_cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def check(kernel, ref, inputs, dtype, what, baseline=None):
    assert_close_to_reference(kernel, ref, inputs, atol=4 * torch.finfo(dtype).eps, rtol=0, what=f"{what} {dtype}",
                              device="cuda", dtype=dtype, baseline=baseline or ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", [(1, 1), (5, 17), (300, 100), (600, 3077)])  # h > one 256-thread tile
def test_bias_gelu_cuda(dtype, rows, h):
    x, b = leaf(rand(rows, h, seed=h, scale=3.0)), leaf(rand(h, seed=1))
    check(kernels.bias_gelu, reference.bias_gelu, [x, b], dtype, f"bias_gelu [{rows}, {h}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sk", [1, 31, 33, 512, 1030])  # rows shorter and longer than one warp's 32 lanes
def test_scaled_masked_softmax_cuda(dtype, sk):
    b, heads, sq = 2, 3, 6
    x = leaf(rand(b, heads, sq, sk, seed=sk, scale=3.0))
    g = torch.Generator().manual_seed(sk)
    mask = torch.rand(b, 1, sq, sk, generator=g) < 0.3
    mask[0, 0, 2] = True  # fully masked row: zeros
    additive = torch.randn(b, 1, sq, sk, generator=g).to(dtype).double()  # values exact in dtype
    for name, m in {"bool": mask, "additive": additive, "none": None}.items():
        def on(t, m=m):  # the mask on t's device; an additive mask in t's dtype
            return None if m is None else m.to(t.device) if m.dtype == torch.bool else m.to(t.device, t.dtype)

        check(lambda t, on=on: kernels.scaled_masked_softmax(t, on(t), 0.3),
              lambda t, on=on: reference.scaled_masked_softmax(t, on(t), 0.3), [x], dtype, f"softmax {name} sk={sk}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 33, 257])
def test_causal_softmax_cuda(dtype, sq):
    x = leaf(rand(4, sq, sq, seed=sq, scale=3.0))
    check(lambda t: kernels.scaled_upper_triang_masked_softmax(t, 0.2),
          lambda t: reference.scaled_upper_triang_masked_softmax(t, 0.2), [x], dtype, f"causal sq={sq}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,h", [(1, 1), (7, 33), (300, 1030), (700, 64)])  # > 256 row groups for the sums
def test_layer_norm_cuda(dtype, rows, h):
    x, w, b = leaf(rand(rows, h, seed=h, scale=2.0)), leaf(rand(h, seed=1)), leaf(rand(h, seed=2))
    check(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), lambda x, w, b: reference.layer_norm(x, w, b, 1e-5),
          [x, w, b], dtype, f"layer_norm [{rows}, {h}]",
          baseline=lambda x, w, b: F.layer_norm(x, (h,), w, b, 1e-5))


def test_cuda_and_cpu_kernels_agree_in_float32():
    x, b = rand(64, 300).float(), rand(300, seed=1).float()
    torch.testing.assert_close(kernels.bias_gelu(x.cuda(), b.cuda()).cpu(), kernels.bias_gelu(x, b),
                               rtol=1e-5, atol=1e-5)  # float32, different tanh implementations
