"""The comparison helpers every verification uses: NaN and inf must fail them, whatever the order."""
import math

import pytest
import torch

from lessons_pkg.utils import check_close, largest, max_abs_error, within

NAN, INF = float("nan"), float("inf")


def test_max_abs_error_is_the_largest_difference():
    assert max_abs_error(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])) == 0.5


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
@pytest.mark.parametrize("side", ["a", "b", "both"])
def test_max_abs_error_is_inf_on_any_non_finite_value(bad, side):
    good, broken = torch.tensor([1.0, 2.0]), torch.tensor([1.0, bad])
    a = broken if side in ("a", "both") else good
    b = broken if side in ("b", "both") else good
    assert max_abs_error(a, b) == INF  # inf - inf would be nan, equal infs would be 0


def test_max_abs_error_is_inf_when_shapes_differ():
    assert max_abs_error(torch.zeros(3), torch.zeros(1)) == INF  # broadcasting would hide it


@pytest.mark.parametrize("errors", [[NAN, 0.0], [0.0, NAN], [0.0, INF], [NAN]])
def test_largest_does_not_drop_a_nan(errors):
    assert largest(errors) == INF
    assert largest([0.1, 0.3, 0.2]) == 0.3 and largest([]) == 0.0


def test_pythons_max_is_why_largest_exists():
    assert max([0.0, NAN]) == 0.0  # a NaN error after a finite one vanishes


def test_within_fails_on_nan_and_inf():
    assert within(1e-7, 1e-6) and within(1e-6, 1e-6)
    assert not within(1e-5, 1e-6) and not within(NAN, 1e-6) and not within(INF, math.inf)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_check_close_fails_on_non_finite_values_even_when_both_agree(bad):
    a = torch.tensor([1.0, bad])
    assert torch.allclose(a, a.clone()) == (bad == INF)  # allclose calls equal infs close
    assert not check_close(a, a.clone(), rtol=1e-5, atol=1e-6)
    assert check_close(torch.ones(2), torch.ones(2) + 1e-7, rtol=0, atol=1e-6)
    assert not check_close(torch.ones(2), torch.ones(1), rtol=0, atol=1)  # no broadcasting
