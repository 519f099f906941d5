"""Seed statistics for the paper tables: mean ± std, t-based 95 % CIs, paired differences.

The segmenter's own seed-to-seed noise is as large as the effects we measure (DESIGN.md,
"Lessons"), so every number in ``results.md`` carries its spread, and methods are compared
**paired by seed**: the same segmenter seed with and without augmentation, differenced first.
A CI from fewer than two values is undefined and is returned as NaN, never as a zero-width
interval that would look like certainty.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional

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
                      level: float = 0.95) -> Dict[str, Any]:
    """Mean and CI of ``a - b`` over the seeds both sides have.

    Pairing removes the seed's shared effect (split, initialisation, batch order), which is
    the dominant noise in few-shot segmentation; unpaired seeds are left out, not imputed.

    Args:
        a_by_seed: seed -> value of the method.
        b_by_seed: seed -> value of the baseline.
        level: confidence level.

    Returns:
        ``{mean, std, ci95_low, ci95_high, n, seeds}`` where ``n`` is the number of pairs and
        ``seeds`` the paired seeds (sorted). The CI is NaN when ``n < 2``.
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
    return result


def _seed_order(seed: str) -> tuple:
    """Numeric seeds sort numerically ("2" before "10"); others after, as text."""
    try:
        return (0, float(seed), seed)
    except ValueError:
        return (1, 0.0, seed)


def fmt(value: Optional[float], spec: str = ".3f", signed: bool = False) -> str:
    """Format a number for a table cell; NaN/None become "n/a"."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return format(float(value), ("+" if signed else "") + spec)


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
