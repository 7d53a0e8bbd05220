"""companion.claims: a claim fails on a violated bound and on NaN/inf, and prints its margin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from companion.claims import ClaimError, claim, max_abs_diff


def test_claim_holds_prints_value_bound_and_margin(capsys):
    assert claim("gap", 0.25, lt=0.4, glue=False) == 0.25
    assert capsys.readouterr().out == "gap = 0.25  (claim: < 0.4, margin 0.15)\n"


def test_two_sided_claim_reports_the_nearest_bound(capsys):
    claim("acc", 0.9, gt=0.5, le=0.95, glue=False)
    assert capsys.readouterr().out.strip() == "acc = 0.9  (claim: > 0.5 and <= 0.95, margin 0.05)"


@pytest.mark.parametrize("value, bounds", [
    (0.5, {"lt": 0.4}), (0.4, {"lt": 0.4}), (0.3, {"gt": 0.4}), (0.4, {"gt": 0.4}),
    (0.41, {"le": 0.4}), (0.39, {"ge": 0.4}), (1.0, {"gt": 0.0, "lt": 0.5}),
])
def test_violated_bounds_fail(value, bounds):
    with pytest.raises(ClaimError, match="does not satisfy"):
        claim("x", value, glue=False, **bounds)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, torch.tensor(math.nan)])
@pytest.mark.parametrize("bound", [{"lt": 1.0}, {"gt": -1.0}, {"le": math.pi}])
def test_non_finite_values_fail_whatever_the_bound(value, bound):
    with pytest.raises(ClaimError, match="not a finite number"):
        claim("x", value, glue=False, **bound)


def test_tensor_values_and_bad_arguments():
    assert claim("t", torch.tensor(1e-15, dtype=torch.float64), lt=1e-12, glue=False) == 1e-15
    with pytest.raises(TypeError, match="one-element tensor"):
        claim("t", torch.zeros(2), lt=1.0, glue=False)
    assert claim("t", np.int64(3), gt=2, glue=False) == 3.0
    assert claim("t", np.array([0.5]), lt=1.0, glue=False) == 0.5
    with pytest.raises(TypeError, match="one-element tensor"):
        claim("t", np.zeros(3), lt=1.0, glue=False)
    with pytest.raises(TypeError, match="value must be a real number"):
        claim("t", "0.1", lt=1.0, glue=False)
    with pytest.raises(TypeError, match="value must be a real number"):
        claim("t", np.bool_(True), lt=2.0, glue=False)
    with pytest.raises(TypeError, match="value must be"):
        claim("t", True, lt=2.0, glue=False)
    with pytest.raises(ValueError, match="at least one bound"):
        claim("t", 0.1, glue=False)
    with pytest.raises(ValueError, match="lt must be finite"):
        claim("t", 0.1, lt=math.nan, glue=False)
    with pytest.raises(ValueError, match="key must be"):
        claim("two words", 0.1, lt=1.0, glue=False)


def test_glue_outside_a_kernel_is_a_no_op(capsys):
    claim("outside", 1.0, gt=0.0)  # no IPython kernel: prints, glues nothing, no error
    assert capsys.readouterr().out.startswith("outside = 1")


def test_max_abs_diff_propagates_nan_where_max_over_a_generator_drops_it():
    a = [torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    b = [torch.tensor([0.0, 1e-15, 0.0], dtype=torch.float64),
         torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64)]
    # the trap: a NaN that is not first is dropped by max()
    assert max((x - y).abs().max().item() for x, y in zip(a, b)) == 1e-15
    assert math.isnan(max_abs_diff(zip(a, b)))
    with pytest.raises(ClaimError):
        claim("gap", max_abs_diff(zip(a, b)), lt=1e-12, glue=False)


def test_max_abs_diff_values_and_checks():
    assert max_abs_diff([(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 0.0]))]) == 2.0
    assert max_abs_diff([(torch.zeros(0), torch.zeros(0))]) == 0.0
    assert max_abs_diff([(torch.tensor(3.0), torch.tensor(-1.0))]) == 4.0
    with pytest.raises(ValueError, match="shapes differ"):
        max_abs_diff([(torch.zeros(2, 1), torch.zeros(2))])
    with pytest.raises(ValueError, match="empty"):
        max_abs_diff([])
