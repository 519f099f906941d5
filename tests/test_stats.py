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


def test_holm_on_a_constructed_family():
    from experiments.reporting.stats import holm

    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 -> max(0.06, 0.04) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, None, 0.005])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[4] == pytest.approx(0.02)
    assert math.isnan(adjusted[3])  # untestable: not counted in m
    assert [p <= 0.05 for p in adjusted] == [True, False, False, False, True]
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0]) and holm([0.6, 0.7, 0.8]) == pytest.approx([1.0, 1.0, 1.0])


def test_mde_matches_the_textbook_and_a_simulation():
    import numpy as np

    from experiments.reporting.stats import mde_paired

    # G*Power (t test, one sample / matched pairs, two-tailed α = .05, power .8): dz = 0.996 at n = 10,
    # 0.660 at n = 20; large n approaches the normal figure (z_.975 + z_.8) = 2.8016 SD / √n.
    assert mde_paired(1.0, 10) == pytest.approx(0.996, abs=0.001)
    assert mde_paired(1.0, 20) == pytest.approx(0.660, abs=0.001)
    assert mde_paired(2.0, 10) == pytest.approx(2 * mde_paired(1.0, 10))
    assert mde_paired(1.0, 400) * 20 == pytest.approx(2.8016, abs=0.01)
    # simulated paired experiments at exactly the MDE are found significant 80 % of the time
    rng = np.random.default_rng(0)
    n, sd = 10, 0.05
    samples = rng.normal(mde_paired(sd, n), sd, size=(20000, n))
    p = st.ttest_1samp(samples, 0.0, axis=1).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.80, abs=0.01)
    assert math.isnan(mde_paired(0.1, 1)) and mde_paired(0.0, 5) == 0.0


def test_paired_difference_carries_p_and_mde():
    d = paired_difference({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.55, 2: 0.6})
    diffs = [0.1, 0.15, 0.05]
    assert d["p"] == pytest.approx(st.ttest_1samp(diffs, 0).pvalue)
    assert d["mde80"] > 0


def test_paired_power_is_what_a_simulation_rejects_and_inverts_the_mde():
    import numpy as np
    from scipy import stats

    from experiments.reporting.stats import mde_paired, paired_power

    assert paired_power(mde_paired(0.05, 20, 0.0125), 0.05, 20, 0.0125) == pytest.approx(0.8, abs=1e-6)
    assert paired_power(0.03, 0.05, 40) > paired_power(0.03, 0.05, 20) > paired_power(0.0, 0.05, 20)
    assert paired_power(0.0, 0.05, 20) == pytest.approx(0.05, abs=1e-9)  # no effect: the test's own level
    diffs = np.random.default_rng(1).normal(0.03, 0.06, size=(4000, 20))
    rejected = float((stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.0125).mean())
    assert rejected == pytest.approx(paired_power(0.03, 0.06, 20, 0.0125), abs=0.025)
