"""Seed statistics for the paper tables: mean ± std, t-based 95 % CIs, paired differences.

The segmenter's own seed-to-seed noise at a few labelled pairs is as large as the effects measured
here, so every number in ``results.md`` carries its spread, and methods are compared
**paired by seed**: the same segmenter seed with and without augmentation, differenced first.
A CI from fewer than two values is undefined and is returned as NaN, never as a zero-width
interval that would look like certainty.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as _st

NAN = float("nan")


def _finite(values: Iterable[Any]) -> np.ndarray:
    """Float array of the finite entries of ``values`` (None/NaN/inf dropped)."""
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out.append(number)
    return np.asarray(out, dtype=float)


def t_interval(mean: float, std: float, n: int, level: float = 0.95) -> tuple:
    """Two-sided t confidence interval of a mean.

    Args:
        mean: sample mean.
        std: sample standard deviation (ddof=1).
        n: number of values.
        level: confidence level.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``n < 2`` (no spread estimate exists).
    """
    if n < 2 or not math.isfinite(std):
        return NAN, NAN
    half = float(_st.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Iterable[Any], level: float = 0.95) -> Dict[str, float]:
    """Mean, sample std and t-based CI of the finite ``values``.

    Args:
        values: one number per seed; None/NaN entries are ignored.
        level: confidence level of the interval.

    Returns:
        ``{mean, std, ci95_low, ci95_high, n}``; ``std`` and the CI are NaN for ``n < 2``,
        everything but ``n`` is NaN for ``n == 0``. A constant sample has a zero-width CI.
    """
    arr = _finite(values)
    n = int(arr.size)
    constant = n >= 1 and bool(np.all(arr == arr[0]))
    # A constant sample gets its exact value and zero spread (np.mean would add rounding noise).
    mean = float(arr[0]) if constant else float(arr.mean()) if n else NAN
    std = (0.0 if constant else float(arr.std(ddof=1))) if n >= 2 else NAN
    low, high = t_interval(mean, std, n, level)
    return {"mean": mean, "std": std, "ci95_low": low, "ci95_high": high, "n": n}


def paired_difference(a_by_seed: Mapping[Any, Any], b_by_seed: Mapping[Any, Any],
                      level: float = 0.95, mde_alpha: float = 0.05) -> Dict[str, Any]:
    """Mean and CI of ``a - b`` over the seeds both sides have.

    Pairing removes the seed's shared effect (split, initialisation, batch order), which is
    the dominant noise in few-shot segmentation; unpaired seeds are left out, not imputed.

    Args:
        a_by_seed: seed -> value of the method.
        b_by_seed: seed -> value of the baseline.
        level: confidence level.
        mde_alpha: two-sided level of the MDE (a table states it at its Holm level).

    Returns:
        ``{mean, std, ci95_low, ci95_high, n, seeds, p, mde80}`` where ``n`` is the number of
        pairs, ``seeds`` the paired seeds (sorted), ``p`` the paired t-test's two-sided p and
        ``mde80`` the minimum detectable effect at 80 % power (:func:`mde_paired`). The CI, p and
        MDE are NaN when ``n < 2``.
    """
    a = {str(k): v for k, v in a_by_seed.items()}
    b = {str(k): v for k, v in b_by_seed.items()}
    seeds, diffs = [], []
    for seed in sorted(set(a) & set(b), key=_seed_order):
        pair = _finite([a[seed], b[seed]])
        if pair.size == 2:
            seeds.append(seed)
            diffs.append(pair[0] - pair[1])
    result: Dict[str, Any] = summarize(diffs, level)
    result["seeds"] = seeds
    result["p"] = paired_p_value(diffs)  # paired t-test; tables correct it with Holm per table
    result["mde80"] = mde_paired(result["std"], result["n"], alpha=mde_alpha)
    return result


def _seed_order(seed: str) -> tuple:
    """Numeric seeds sort numerically ("2" before "10"); others after, as text."""
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


STABLE_DIGITS = 10  # what every CPU agrees on: far below a table's precision, far above the last bit


def stable(value: float) -> float:
    """``value`` rounded to :data:`STABLE_DIGITS` significant digits before a table rounds it again.

    A mean such as 9.5 / 20 sits on a rounding boundary (0.475 → "0.47" or "0.48") and one ulp of
    difference between CPUs would flip its printed digit; rounding to 10 digits first maps both
    neighbours of the boundary to the same float, so every machine prints the same text.
    """
    return float(f"{value:.{STABLE_DIGITS}g}") if math.isfinite(value) else value


def fmt(value: Optional[float], spec: str = ".3f", signed: bool = False) -> str:
    """Format a number for a table cell (via :func:`stable`); NaN/None become "n/a"."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return format(stable(float(value)), ("+" if signed else "") + spec)


def jsonable(value: Any) -> Any:
    """Recursively replace NaN/inf by None and numpy scalars by Python ones (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


PUBLISHED_DIGITS = 6  # significant digits of results.json: the last bits differ between CPUs (AVX2, AVX-512, NEON)


def published(value: Any, digits: int = PUBLISHED_DIGITS) -> Any:
    """:func:`jsonable`, with every float rounded to ``digits`` significant digits, so the published
    file is the same on every machine whose arithmetic agrees to far better than that."""
    return _rounded(jsonable(value), digits)


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, float) and value != 0:
        return float(f"{stable(value):.{digits}g}")
    return value


def paired_p_value(diffs: Iterable[Any]) -> float:
    """Two-sided p of a paired t-test on per-seed differences (H0: mean difference 0).

    Args:
        diffs: one ``a - b`` per paired seed; None/NaN dropped.

    Returns:
        The p-value; NaN for fewer than two pairs. Identical differences (zero spread) give
        0 when they are not all 0 and 1 when they are (the t statistic is ±inf or 0/0 there).
    """
    arr = _finite(diffs)
    if arr.size < 2:
        return NAN
    if np.all(arr == arr[0]):
        return 1.0 if arr[0] == 0 else 0.0
    return float(_st.ttest_1samp(arr, 0.0).pvalue)


def holm(p_values: Sequence[Optional[float]]) -> List[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence).

    scipy has no Holm correction (``scipy.stats.false_discovery_control`` controls the false
    discovery rate, Benjamini-Hochberg/-Yekutieli, a weaker promise) and statsmodels is not a
    dependency, so it is written out: sort the m p-values, multiply the i-th smallest by
    ``m - i`` (i from 0), carry the running maximum so the adjusted values keep the order, cap at 1.
    A comparison is significant at family-wise level α when its adjusted p is ≤ α.

    Args:
        p_values: one p per comparison of the family; None/NaN entries (untestable
            comparisons) are not counted in m and come back as NaN.

    Returns:
        The adjusted p-values in the input order.
    """
    valid = [(p, i) for i, p in enumerate(p_values) if p is not None and math.isfinite(float(p))]
    out = [NAN] * len(p_values)
    running, m = 0.0, len(valid)
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * float(p)))
        out[i] = running
    return out


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test over ``n`` pairs at true mean difference ``effect``.

    ``P(|T| > t_crit)`` with T noncentral t (df = n − 1, noncentrality effect·√n / sd). statsmodels'
    ``TTestPower.power`` does the same, but statsmodels is not a dependency of this suite.

    Args:
        effect: the true mean difference, in the metric's units.
        sd: SD of the per-pair differences.
        n: number of pairs (>= 2).
        alpha: two-sided significance level.
    """
    df, crit = n - 1, float(_st.t.ppf(1 - alpha / 2, n - 1))
    nc = float(effect) / float(sd) * math.sqrt(n)
    reach = float(_st.nct.sf(crit, df, nc) + _st.nct.cdf(-crit, df, nc))
    if not math.isfinite(reach):  # scipy's nct gives NaN for large df and nc; T is normal there
        reach = float(_st.norm.sf(crit - nc) + _st.norm.cdf(-crit - nc))
    return reach


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t-test: the smallest true mean difference
    found significant with probability ``power``, given the paired SD observed over ``n`` pairs.

    Solves :func:`paired_power` (effect) = ``power`` with a root finder.

    Args:
        sd: sample SD of the per-seed differences.
        n: number of pairs.
        alpha: two-sided significance level.
        power: the wanted power.

    Returns:
        The MDE in the metric's units; NaN for ``n < 2`` or a non-finite SD, 0 for a zero SD.
    """
    if n < 2 or sd is None or not math.isfinite(float(sd)):
        return NAN
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    def shortfall(d: float) -> float:  # d: effect in SD units (Cohen's d_z)
        return paired_power(d, 1.0, n, alpha) - power

    high = 1.0 / math.sqrt(n)
    while shortfall(high) < 0:  # bracket the root: power grows with the effect
        high *= 2
    return float(brentq(shortfall, 0.0, high, xtol=1e-10)) * float(sd)
