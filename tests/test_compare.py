"""One comparison rule for every check: elementwise |Δ| ≤ atol + rtol·|ref|, atol absolute or of the scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bntool.compare import Comparison, Tolerance, combine, compare_arrays, compare_outputs
from bntool.errors import InputError


def test_reports_worst_element_and_mismatched_fraction():
    ref = np.zeros((2, 3), dtype=np.float32)
    out = ref.copy()
    out[1, 2] = 1e-3
    c = compare_arrays("x", "y", ref, out, Tolerance(rtol=1e-4, atol=1e-5, atol_relative=False))
    assert not c and not c.passed and c.worst_index == [1, 2] and c.max_abs == pytest.approx(1e-3)
    assert c.mismatched_fraction == pytest.approx(1 / 6)
    assert c.threshold == pytest.approx(1e-5)


def test_default_atol_scales_with_the_output():
    """Reordered float32 sums differ by ~1e-6 of the output's magnitude, also at elements near zero: that
    passes with atol relative to the scale, while an error of 1e-3 of the magnitude fails."""
    ref = np.array([5.0, -4.0, 0.01, 2.0], dtype=np.float32)
    noisy = ref + np.array([1e-5, -2e-5, 2.5e-5, 0], dtype=np.float32)
    relative = Tolerance(rtol=1e-4, atol=1e-4)
    c = compare_arrays("x", "y", ref, noisy, relative)
    assert c.passed and c.threshold == pytest.approx(5e-4) and c.max_abs_over_scale == pytest.approx(5e-6, rel=0.1)
    # max_rel_elementwise: |Δ|/|ref| over elements with |ref| > the threshold (here the 0.01 element)
    assert c.max_rel_elementwise == pytest.approx(2.5e-5 / 0.01, rel=0.01)
    wrong = ref.copy()
    wrong[2] += 5e-3
    assert not compare_arrays("x", "y", ref, wrong, relative)
    given = Tolerance.resolve(None, 1e-5, relative)  # an atol the user gives is absolute
    assert not given.atol_relative and given.rtol == 1e-4
    assert not compare_arrays("x", "y", ref, noisy, given)


def test_rule_is_elementwise_allclose():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50,))
    cand = ref + rng.normal(size=(50,)) * 1e-3
    for rtol, atol in [(1e-3, 0.0), (0.0, 2e-3), (1e-3, 1e-3)]:
        c = compare_arrays("x", "y", ref, cand, Tolerance(rtol, atol, atol_relative=False))
        assert c.passed == np.allclose(cand, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_candidate_fails_where_reference_is_finite(bad):
    ref = np.array([1.0, 2.0, 3.0])
    cand = ref.copy()
    cand[1] = bad
    c = compare_arrays("x", "y", ref, cand, Tolerance(1e10, 1e10, atol_relative=False))
    assert not c.passed and c.max_abs == math.inf and c.worst_index == [1]


def test_matching_nan_and_inf_pass():
    ref = np.array([math.nan, math.inf, 1.0])
    assert compare_arrays("x", "y", ref, ref.copy(), Tolerance(0, 0, atol_relative=False)).passed


def test_combined_figures_keep_nan_and_failure():
    ok = Comparison("a", "o1", True, max_abs=1e-6)
    bad = Comparison("a", "o2", False, max_abs=math.nan)
    merged = combine([ok, bad])
    assert not merged.passed and merged.max_abs == math.inf  # Python's max() would have dropped the NaN


def test_shape_mismatch_and_integer_outputs():
    c = compare_arrays("x", "y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance(1, 1))
    assert not c.passed and "shape" in c.note
    ints = torch.tensor([1, 2, 3])
    assert not compare_arrays("x", "y", ints, torch.tensor([1, 2, 4]), Tolerance(1, 1)).passed
    assert compare_arrays("x", "y", ints, ints.clone(), Tolerance(0, 0)).passed


def test_nested_outputs_compared_per_tensor():
    ref = {"a": torch.ones(2), "b": (torch.zeros(3),)}
    cand = {"a": torch.ones(2), "b": (torch.full((3,), 0.5),)}
    cs = compare_outputs("in", ref, cand, Tolerance(0, 1e-3, atol_relative=False))
    assert [c.passed for c in cs] == [True, False] and cs[1].max_abs == pytest.approx(0.5)
    with pytest.raises(InputError, match="returns 1 tensors"):
        compare_outputs("in", ref, torch.ones(2), Tolerance(0, 0))


@pytest.mark.parametrize("rtol,atol", [(-1, 0), (0, math.nan), (math.inf, 0)])
def test_tolerance_rejects_nonsense(rtol, atol):
    with pytest.raises(InputError):
        Tolerance(rtol, atol)


def test_tolerance_describes_its_rule():
    assert Tolerance(1e-4, 1e-4).describe() == "|Δ| ≤ 1e-04·max|ref| + 0.0001·|ref|"
    assert Tolerance(0, 1e-6, atol_relative=False).describe() == "|Δ| ≤ 1e-06 + 0·|ref|"


def test_a_reference_that_is_nan_everywhere_fails_with_nothing_compared():
    nan = np.full((2, 3), np.nan)
    c = compare_arrays("example", "output", nan, nan.copy(), Tolerance(1e-4, 1e-4))
    assert not c.passed and "NaN everywhere" in c.note and c.max_abs == math.inf


def test_matching_nans_in_part_of_the_reference_pass_and_say_how_many():
    ref = np.array([1.0, np.nan, 2.0, 3.0])
    c = compare_arrays("random #1", "output", ref, ref.copy(), Tolerance(1e-4, 1e-4))
    assert c.passed and c.note == "1 of 4 reference elements are NaN"
    assert not compare_arrays("x", "y", ref, np.array([1.0, 0.0, 2.0, 3.0]), Tolerance(1e-4, 1e-4)).passed


def test_health_flags_count_channels_in_words():
    from bntool.inspection import health_flags

    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    bn.running_var.fill_(1.5)
    bn.running_var[1] = float("nan")
    bn.running_var[2:] = 0.0
    flags = health_flags(bn)
    assert "NaN/Inf in running_var (1 channel)" in flags and "var <= eps in 2 channels" in flags, flags


def test_the_atol_shown_is_the_number_the_rule_used_on_the_worst_comparison():
    from bntool.compare import ComparedReport

    ref = np.array([1.0, -10.0, 0.5])
    small = compare_arrays("a", "y", ref, ref + 1e-6, Tolerance(rtol=0.0, atol=1e-4))  # atol share of max|ref|
    large = compare_arrays("b", "y", 10 * ref, 10 * ref + 1e-5, Tolerance(rtol=0.0, atol=1e-4))
    assert small.threshold == pytest.approx(1e-3) and large.threshold == pytest.approx(1e-2)
    report = ComparedReport()
    report.comparisons = [small, large]
    assert report.atol_at_worst == large.threshold and report.summary_figures()["atol_at_worst"] == large.threshold
