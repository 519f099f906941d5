"""Seed statistics: t-based CIs, paired differences, and honest 'undefined' for n < 2."""
import math

import pytest
from scipy import stats as st

from experiments.reporting.stats import fmt, jsonable, paired_difference, summarize


def test_summarize_matches_hand_computed_t_interval():
    values = [0.5, 0.55, 0.45, 0.6]
    s = summarize(values)
    mean, sd = 0.525, st.tstd(values)
    half = st.t.ppf(0.975, 3) * sd / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(sd)
    assert s["ci95_low"] == pytest.approx(mean - half) and s["ci95_high"] == pytest.approx(mean + half)
    assert s["ci95_low"] < s["mean"] < s["ci95_high"]


def test_constant_values_have_zero_width_ci():
    s = summarize([0.7, 0.7, 0.7])
    assert s["std"] == 0 and s["ci95_low"] == s["ci95_high"] == pytest.approx(0.7)


@pytest.mark.parametrize("values,n", [([], 0), ([0.4], 1), ([None, float("nan"), 0.4], 1)])
def test_too_few_values_leave_spread_undefined(values, n):
    s = summarize(values)
    assert s["n"] == n
    assert math.isnan(s["std"]) and math.isnan(s["ci95_low"]) and math.isnan(s["ci95_high"])
    assert (n == 0) == math.isnan(s["mean"])


def test_paired_difference_pairs_by_seed_and_ignores_unpaired():
    a = {0: 0.58, 1: 0.60, 2: 0.50, 3: 0.66, 4: 0.99}  # seed 4 has no baseline: not paired
    b = {"0": 0.50, "1": 0.55, "2": 0.45, "3": 0.60, "7": 0.1}
    d = paired_difference(a, b)
    diffs = [0.08, 0.05, 0.05, 0.06]
    half = st.t.ppf(0.975, 3) * st.tstd(diffs) / 2
    assert d["n"] == 4 and d["seeds"] == ["0", "1", "2", "3"]
    assert d["mean"] == pytest.approx(0.06)
    assert d["ci95_low"] == pytest.approx(0.06 - half) and d["ci95_high"] == pytest.approx(0.06 + half)


def test_paired_difference_with_one_pair_has_no_fake_ci():
    d = paired_difference({0: 0.6, 1: 0.7}, {0: 0.5})
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.1)
    assert math.isnan(d["ci95_low"]) and math.isnan(d["ci95_high"])
    assert jsonable(d)["ci95_low"] is None  # strict JSON: null, not NaN


def test_paired_difference_skips_missing_values():
    d = paired_difference({0: 0.6, 1: None}, {0: 0.5, 1: 0.4})
    assert d["n"] == 1


def test_fmt():
    assert fmt(0.1234) == "0.123" and fmt(0.05, ".3f", signed=True) == "+0.050"
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a"
