"""lessons_pkg.tensor_parallel.dropout: 15-bit dropout masks on the CPU, F.dropout elsewhere.

Statistical bounds are 6 standard deviations of the binomial count (a false failure about once
in 10^9 runs): the seeds are fixed, so a run passes or fails the same way every time, and a
wrong keep probability (a bias of 2^-16 goes undetected, one of 0.005 in the whole mask, or of 0.01
in one lane of a word, does not) fails them.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lessons_pkg.tensor_parallel.dropout import LEVELS, dropout, keep_mask, quantized_drop_probability


def assert_rate(kept: torch.Tensor, expected: float, what: str) -> None:
    n = kept.numel()
    rate = kept.double().mean().item()
    bound = 6 * math.sqrt(expected * (1 - expected) / n)
    assert abs(rate - expected) <= bound, f"{what}: keep rate {rate:.6f}, expected {expected:.6f} +- {bound:.6f}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.0123])
def test_keep_rate_is_one_minus_p_in_every_lane_of_a_word(p):
    """Every one of the four 15-bit numbers cut from a 64-bit word keeps at the same rate (the
    fourth has one random bit fewer: were it not masked like the others, its rate would be off)."""
    torch.manual_seed(0)
    keep = keep_mask((4, 2**18), p)
    expected = 1 - quantized_drop_probability(p)
    assert_rate(keep, expected, f"p={p}")
    for lane in range(4):
        assert_rate(keep.view(-1, 4)[:, lane], expected, f"p={p}, lane {lane} of each word")
    # elements 1 to 4 apart are independent (within a word and across words): both kept at rate (1 - p')^2
    flat = keep.flatten()
    for lag in range(1, 5):
        assert_rate(flat[:-lag] & flat[lag:], expected**2, f"p={p}, elements {lag} apart both kept")


def test_quantised_probability_is_within_2_to_the_minus_16():
    for p in torch.linspace(0.0, 1.0, 1001).tolist():
        assert abs(quantized_drop_probability(p) - p) <= 2**-16 + 1e-12, p
    assert quantized_drop_probability(0.1) == 3277 / LEVELS


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_values_are_zero_or_scaled_and_unbiased(p):
    torch.manual_seed(1)
    x = torch.randn(1000, 1000)
    y = dropout(x, p)
    scale = 1 / (1 - quantized_drop_probability(p))
    kept = y != 0
    assert torch.equal(y[kept], x[kept] * scale), "kept values must be x / (1 - p') exactly"
    assert_rate(kept, 1 - quantized_drop_probability(p), f"p={p}")
    ones = dropout(torch.ones(2**20), p)                       # E[y] = 1 exactly with the scale of p'
    sigma = math.sqrt(quantized_drop_probability(p) / (1 - quantized_drop_probability(p)) / ones.numel())
    assert abs(ones.double().mean().item() - 1) <= 6 * sigma


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 300, requires_grad=True)
    dy = torch.randn(64, 300)
    y = dropout(x, 0.25)
    (gx,) = torch.autograd.grad(y, x, dy)
    scale = 1 / (1 - quantized_drop_probability(0.25))
    kept = y.detach() != 0
    assert torch.equal(gx, torch.where(kept, dy, 0.0) * scale)
    assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(3), dropout(t, 0.25))[1],
                                    (torch.randn(5, 7, dtype=torch.float64, requires_grad=True),))


def test_same_seed_same_mask_and_the_default_generator_advances():
    x = torch.randn(16, 33)
    torch.manual_seed(4)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(dropout(x, 0.5), a), "the same random state must give the same mask"
    assert not torch.equal(a, b), "consecutive calls must draw new masks"
    g = torch.Generator().manual_seed(5)
    assert torch.equal(keep_mask((3, 7), 0.5, generator=g), keep_mask((3, 7), 0.5, generator=torch.Generator().manual_seed(5)))


def test_identity_when_off_and_f_dropout_where_15_bits_do_not_fit():
    x = torch.randn(8, 8)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    for p in (1e-4, 0.999999):                           # p' would be more than 0.2% off p: F.dropout
        torch.manual_seed(6)
        ours = dropout(x, p)
        torch.manual_seed(6)
        assert torch.equal(ours, F.dropout(x, p, True)), p
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=f"p={bad}"):
            dropout(x, bad)


def test_dtypes_shapes_and_non_contiguous_input():
    torch.manual_seed(7)
    x = torch.randn(6, 10, dtype=torch.bfloat16).t()      # [10, 6], not contiguous
    y = dropout(x, 0.2)
    assert y.dtype == torch.bfloat16 and y.shape == (10, 6)
    kept = y != 0
    scale = torch.tensor(1 / (1 - quantized_drop_probability(0.2))).bfloat16()  # the noise is in x's dtype
    assert torch.equal(y[kept], x[kept] * scale)
    assert dropout(torch.empty(0, 5), 0.5).shape == (0, 5)
    x = torch.full((1000,), float("nan"))
    assert dropout(x, 0.5).isnan().all(), "x * noise, as in F.dropout: NaN stays NaN, dropped or not"


def test_bench_dropout_script_runs_and_reports_both():
    """scripts/bench_dropout.py runs end to end (tiny shapes): every pass timed for both, ratios computed."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_dropout.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--rounds", "2", "--threads", "1"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| small")]
    assert [r.split("|")[2].strip() for r in rows] == ["mask", "forward", "forward+backward"], out.stdout
    for r in rows:
        cells = [c.strip() for c in r.split("|")[3:6]]
        f_ms, ours_ms, ratio = float(cells[0]), float(cells[1]), float(cells[2].rstrip("x"))
        assert f_ms > 0 and ours_ms > 0 and abs(ratio - f_ms / ours_ms) <= 0.05 * ratio, r  # ms printed to 3 decimals
    for bad, named in ((["--p", "0.001"], "--p 0.001"), (["--p", "nan"], "--p nan"), (["--rounds", "0"], "--rounds 0")):
        out = subprocess.run([sys.executable, str(script), "--small", *bad], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and named in out.stderr and "|" not in out.stdout, (bad, out.stderr)


def _replicated_dropout_on_a_rank(seed: int) -> list:
    """What one tensor-parallel rank does: seeded like its peers, it drops out a replicated
    ``[b, s, h]`` tensor after an attention-shaped draw (each rank's heads: the same size on every rank)."""
    import torch.distributed as dist

    torch.manual_seed(seed)
    heads_per_rank = 8 // dist.get_world_size()
    dropout(torch.ones(2, heads_per_rank, 16, 16), 0.1)      # [b, nh/tp, s, s] on every rank alike
    out = dropout(torch.arange(2 * 16 * 32, dtype=torch.float32).view(2, 16, 32), 0.1)
    # a list, not a tensor: a tensor crosses the result queue as a shared-memory handle, which the
    # parent could not open once this rank had exited ("Connection reset by peer", seen under load)
    return out.tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_seeded_alike_draw_the_same_mask_as_one_process(world):
    """The module's claim that replicated activations see one mask: every rank's output equals the
    others' and that of one process making the same draws from the same seed (bitwise)."""
    from lessons_pkg.testing import run_on_ranks

    outputs = run_on_ranks(_replicated_dropout_on_a_rank, world, args=(21,), timeout=120)
    torch.manual_seed(21)
    dropout(torch.ones(2, 8 // world, 16, 16), 0.1)
    reference = dropout(torch.arange(2 * 16 * 32, dtype=torch.float32).view(2, 16, 32), 0.1)
    assert (reference == 0).any() and (reference != 0).any()
    for rank, out in enumerate(outputs):
        assert torch.equal(torch.tensor(out), reference), f"rank {rank} of {world} drew another mask"
