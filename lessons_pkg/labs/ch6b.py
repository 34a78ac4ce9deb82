"""Chapter 6b (fused kernels): the math each kernel fuses, written out by hand."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lessons_pkg.kernels import reference
from lessons_pkg.labs import Exercise, Fail, expect_close

F64 = "float64 against float64: only rounding differs"


def _inputs(seed: int, *shape: int, dtype=torch.float64, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def check_bias_gelu(module) -> list[str]:
    x, b, dy = _inputs(0, 4, 6, 32), _inputs(1, 32), _inputs(2, 4, 6, 32)
    lines = [expect_close("bias_gelu(x, b)", module.bias_gelu(x, b), F.gelu(x + b, approximate="tanh"),
                          1e-12, 1e-12, F64)]
    leaf = (x + b).detach().requires_grad_()
    F.gelu(leaf, approximate="tanh").backward(dy)
    with torch.no_grad():
        got = module.bias_gelu_grad(dy, x, b)
    lines.append(expect_close("bias_gelu_grad(dy, x, b) = dy * gelu'(x + b)", got, leaf.grad, 1e-10, 1e-12,
                              F64 + " (autograd of torch's tanh GeLU)"))
    return lines + ["the bias gradient is this summed over every dimension but the last: no extra kernel needed"]


def check_softmax(module) -> list[str]:
    scores, scale = _inputs(3, 6, 5, 5), 0.35
    probs = module.scaled_causal_softmax(scores, scale)
    lines = [expect_close("scaled_causal_softmax", probs,
                          reference.scaled_upper_triang_masked_softmax(scores, scale), 1e-12, 1e-14, F64)]
    if not bool((probs.triu(diagonal=1) == 0).all()):
        raise Fail("scaled_causal_softmax gives weight to future keys (above the diagonal)")
    dy = _inputs(4, 6, 5, 5)
    leaf = scores.clone().requires_grad_()
    reference.scaled_upper_triang_masked_softmax(leaf, scale).backward(dy)
    with torch.no_grad():
        got = module.softmax_grad(dy, probs.detach(), scale)
    lines.append(expect_close("softmax_grad from the saved probabilities", got, leaf.grad, 1e-10, 1e-13,
                              F64 + " (autograd)"))
    big = _inputs(5, 2, 4, 4, scale=40.0)  # scores of +-100 after scale: exp overflows unless the max is subtracted
    stable = module.scaled_causal_softmax(big, 2.5)
    lines.append(expect_close("scaled_causal_softmax of large scores (subtract the row max first)", stable,
                              reference.scaled_upper_triang_masked_softmax(big, 2.5), 1e-10, 1e-14, F64))
    return lines


def check_layer_norm(module) -> list[str]:
    w, b = _inputs(6, 64, scale=1.0), _inputs(7, 64, scale=1.0)
    x = _inputs(8, 3, 7, 64, scale=1.0)
    lines = [expect_close("layer_norm (float64)", module.layer_norm(x, w, b, 1e-5),
                          F.layer_norm(x, (64,), w, b, 1e-5), 1e-10, 1e-12, F64)]
    # float32 activations far from zero, as a residual stream can be: one-pass E[x^2] - E[x]^2 cancels catastrophically
    x32 = (_inputs(9, 8, 64, dtype=torch.float32, scale=1.0) + 3000.0)
    got = module.layer_norm(x32, w.float(), b.float(), 1e-5)
    if got.dtype != torch.float32:
        raise Fail(f"layer_norm returned {got.dtype} for float32 input; keep the input's dtype")
    lines.append(expect_close("layer_norm (float32, inputs around 3000)", got,
                              F.layer_norm(x32.double(), (64,), w, b, 1e-5), 1e-3, 5e-3,
                              "float32 numbers near 3000 are 2.4e-4 apart, so x - mean is known to ~2.4e-4 standard "
                              "deviations, times |weight| up to ~3; E[x^2] - E[x]^2 cancels ~7 digits and misses by 100s"))
    return lines


EXERCISES = [
    Exercise("ch6b.1", "bias + GeLU and its backward, by hand", "ch6b/bias_gelu.py",
             "compare with the kernel: python -m lessons_pkg.kernels.check", check_bias_gelu),
    Exercise("ch6b.2", "the causal scaled softmax and its backward from the saved probabilities", "ch6b/softmax.py",
             "compare with the kernel: python -m lessons_pkg.kernels.check", check_softmax),
    Exercise("ch6b.3", "LayerNorm by hand, and why E[x^2] - E[x]^2 fails in float32", "ch6b/layer_norm.py",
             "benchmark the fused one: python -m lessons_pkg.kernels.bench --quick --no-compile", check_layer_norm),
]
