"""Data efficiency: Dice against the label budget, and what a synthetic pair is worth in real pairs.

The **exchange rate** of an augmented arm at budget n is the number of real pairs real-only training
would need for the same mean Dice, read off the real-only curve interpolated linearly in log n
(:func:`numpy.interp` on the bracketing segment), divided by n. Where it falls outside the measured
budgets it is "more than <max>" / "less than <min>": the curve is never extrapolated. For the point
estimate the real-only curve must rise with n to be inverted; a noisy dip is removed by a running
maximum (cummax, the isotonic fit for a curve that may only rise or stay) and the table says so.

The interval inverts a test, so it agrees with the paired t-test of the same contrast: a budget n'
is in the confidence set when the paired t-test of "the arm at n" against "real only interpolated at
n'" (per seed: ``a_s(n) − [(1−w)·r_s(n_k) + w·r_s(n_k+1)]``, w the log-n position of n' between the
measured budgets n_k and n_k+1) does not reject. At n' = n the contrast is the arm's Dice Δ vs real
only, so an interval excludes 1 exactly when that paired test rejects at the interval's level. The
set is scanned on a fine log-n grid that contains every measured budget; its hull is reported. A
percentile bootstrap over ten seeds is too narrow for this (it can exclude 1 where the paired t-test
of the same contrast does not reject); the tests check the interval's coverage by simulation.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as _st

from experiments.reporting.stats import fmt, stable

ALPHA = 0.05  # family-wise level of the rate family (Bonferroni over every arm × budget)
GRID_PER_SEGMENT = 400  # candidate budgets between two measured ones (log-spaced)


def n_equivalent(target: float, budgets: Sequence[float], curve: Sequence[float]) -> float:
    """The budget at which a monotone (non-decreasing) reference curve reaches ``target``.

    Args:
        target: the mean Dice to reach.
        budgets: the measured budgets, increasing, shape (k,).
        curve: the reference arm's mean Dice at each budget, non-decreasing, shape (k,).

    Returns:
        The interpolated budget (linear in log n); ``inf`` above the curve's top, ``0`` below its
        bottom, the smallest budget reaching it on a flat stretch.
    """
    curve, logn = np.asarray(curve, float), np.log(np.asarray(budgets, float))
    if not math.isfinite(target) or target > curve[-1]:
        return math.inf if math.isfinite(target) else math.nan
    if target < curve[0]:
        return 0.0
    k = int(np.searchsorted(curve, target, side="left"))  # first budget whose mean reaches the target
    if k == 0 or curve[k] == target:
        return float(budgets[k])
    return float(np.exp(np.interp(target, curve[k - 1:k + 1], logn[k - 1:k + 1])))


def candidate_budgets(budgets: Sequence[float]) -> tuple:
    """The scanned budgets n' and, for each, the bracketing index k and log-n weight w of k + 1.

    Returns:
        ``(n_prime (G,), k (G,), w (G,))`` with every measured budget among ``n_prime`` (w = 0 there).
    """
    logn = np.log(np.asarray(budgets, float))
    parts, ks, ws = [], [], []
    for k in range(len(logn) - 1):
        w = np.linspace(0.0, 1.0, GRID_PER_SEGMENT, endpoint=False)
        parts.append(np.exp(logn[k] + w * (logn[k + 1] - logn[k])))
        ks.append(np.full(w.shape, k))
        ws.append(w)
    parts.append(np.exp(logn[-1:]))
    ks.append(np.array([len(logn) - 2 if len(logn) > 1 else 0]))
    ws.append(np.array([1.0 if len(logn) > 1 else 0.0]))
    return np.concatenate(parts), np.concatenate(ks), np.concatenate(ws)


def accepted_budgets(arm: np.ndarray, reference: np.ndarray, budgets: Sequence[float], level: float) -> tuple:
    """The paired-t confidence set of the real-only budget that matches the arm's Dice.

    Args:
        arm: the arm's Dice at one budget, one value per seed, shape (S,).
        reference: real-only Dice per budget and seed, the same seeds in the same order, shape (B, S).
        budgets: the measured budgets, increasing, shape (B,).
        level: the confidence level of the set.

    Returns:
        ``(n_prime (G,), accepted (G,) bool, t (G,))``: the scanned budgets, whether each is in the set,
        and the paired t statistic of arm minus interpolated real only (positive: the arm is better).
    """
    n_prime, k, w = candidate_budgets(budgets)
    ref_at = (1 - w)[:, None] * reference[k] + w[:, None] * reference[np.minimum(k + 1, len(budgets) - 1)]
    diffs = arm[None, :] - ref_at  # (G, S)
    mean, sd, s = diffs.mean(axis=1), diffs.std(axis=1, ddof=1), arm.size
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sd > 0, mean / (sd / math.sqrt(s)), np.where(mean == 0, 0.0, np.sign(mean) * np.inf))
    crit = float(_st.t.ppf(0.5 + level / 2, df=s - 1))
    return n_prime, np.abs(t) <= crit, t


def rate_interval(arm: np.ndarray, reference: np.ndarray, budgets: Sequence[float], level: float) -> tuple:
    """``(low, high)`` of the matched real-only budget: numbers inside the measured range, ``0``/``inf``
    where the set reaches past its lower/upper end (the table then says "less than"/"more than")."""
    n_prime, accepted, t = accepted_budgets(arm, reference, budgets, level)
    if not accepted.any():  # the arm differs from real only at every budget: it lies beyond one end
        return (math.inf, math.inf) if t[-1] > 0 else (0.0, 0.0)
    inside = n_prime[accepted]
    low = 0.0 if accepted[0] else float(inside.min())
    high = math.inf if accepted[-1] else float(inside.max())
    return low, high


def _monotone(curve: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(curve, axis=0)


def exchange_rates(dice: Mapping[str, Mapping[float, Mapping[str, float]]], reference: str,
                   budgets: Sequence[float], alpha: float = ALPHA) -> Dict[str, Any]:
    """Exchange rates of every arm against ``reference``, with simultaneous test-inversion intervals.

    Args:
        dice: arm -> budget -> seed -> Dice of that run.
        reference: the real-only arm.
        budgets: the budgets, increasing.
        alpha: family-wise error of the intervals, split evenly over the family (Bonferroni).

    Returns:
        ``{seeds, monotone_fixed, family, level, rates: {arm: {budget: {...}}}}``: ``seeds`` are those
        present in every (arm, budget) cell; ``monotone_fixed`` lists the budgets where the real-only
        mean curve was raised by the running maximum for the point estimate; ``family`` is the number
        of rates and ``level`` each interval's confidence level (1 − alpha / family); each rate holds
        ``n_equivalent`` and ``ci95`` (numbers, or "more than N"/"less than N"), ``rate`` and
        ``rate_ci95`` (n_equivalent / n), ``supported_above_1`` (the interval's low end > 1) and
        ``supported_below_1`` (its high end < 1: the arm is worth fewer real pairs than it holds).
    """
    arms = list(dice)
    seeds = sorted(set.intersection(*[set(dice[a][n]) for a in arms for n in budgets]) if arms else set(),
                   key=lambda s: (len(s), s))
    out: Dict[str, Any] = {"seeds": seeds, "monotone_fixed": [], "family": 0, "level": None, "rates": {}}
    if len(seeds) < 2 or reference not in dice or len(budgets) < 2:
        return out
    values = np.array([[[dice[a][n][s] for s in seeds] for n in budgets] for a in arms])  # (arm, budget, seed)
    ref = arms.index(reference)
    means = values.mean(axis=2)
    curve = _monotone(means[ref])
    out["monotone_fixed"] = [n for n, raw, fixed in zip(budgets, means[ref], curve) if fixed > raw]
    out["family"] = (len(arms) - 1) * len(budgets)
    out["level"] = level = 1 - alpha / out["family"]
    lo_n, hi_n = float(budgets[0]), float(budgets[-1])
    for a, arm in enumerate(arms):
        if a == ref:
            continue
        out["rates"][arm] = {}
        for j, n in enumerate(budgets):
            point = n_equivalent(means[a, j], budgets, curve)
            low, high = rate_interval(values[a, j], values[ref], budgets, level)
            out["rates"][arm][n] = {
                "n_equivalent": _text(point, lo_n, hi_n), "ci95": [_text(low, lo_n, hi_n), _text(high, lo_n, hi_n)],
                "rate": _text(point / n, lo_n / n, hi_n / n), "rate_ci95": [_text(low / n, lo_n / n, hi_n / n),
                                                                            _text(high / n, lo_n / n, hi_n / n)],
                "supported_above_1": bool(low > n), "supported_below_1": bool(high < n)}
    return out


def _text(value: float, low: float, high: float) -> Any:
    """A number inside the measured range; "more than <high>"/"less than <low>" outside it."""
    if value > high:
        return f"more than {_short(high)}"
    if value < low:
        return f"less than {_short(low)}"
    return float(value)


def _short(value: float) -> str:
    return f"{stable(value):g}" if value >= 1 else f"{stable(value):.2g}"


def show(value: Any, spec: str = ".1f") -> str:
    """A number or an out-of-range text, for a table cell."""
    return value if isinstance(value, str) else fmt(value, spec)


def rate_text(value: Any) -> str:
    """``×1.73`` for a measured rate, the out-of-range text (``more than 1``) otherwise."""
    return value if isinstance(value, str) else f"×{fmt(value, '.2f')}"


def sentence(rates: Mapping[str, Mapping[Any, Mapping[str, Any]]], names: Mapping[str, str], family: int = 0) -> str:
    """The note's sentence on the exchange rates, written from the numbers, whatever they say."""
    supported = [(arm, n, r) for arm, per_n in rates.items() for n, r in per_n.items() if r["supported_above_1"]]
    if not rates:
        return "No exchange rate could be computed (fewer than two seeds complete in every cell)."
    below = [(arm, n, r) for arm, per_n in rates.items() for n, r in per_n.items() if r["supported_below_1"]]
    if not supported:
        text = (f"No exchange rate above 1 is supported: at every budget the simultaneous 95 % interval (Bonferroni "
                f"over the {family} rates) of every augmented arm reaches 1 or below, so these runs do not show that "
                "a synthetic-augmented run saves real labels.")
    else:
        text = (f"Exchange rates above 1 supported by the simultaneous 95 % interval (Bonferroni over the {family} "
                "rates): " + _listed(supported, names) + ".")
    if below:
        text += (" Below 1 by the interval (the arm's runs are worth fewer real pairs "
                 "than their budget holds): " + _listed(below, names) + ".")
    return text


def _listed(found: Sequence[Any], names: Mapping[str, str]) -> str:
    return "; ".join(f"{names.get(arm, arm)} at n = {_short(float(n))} (worth {show(r['n_equivalent'])} real pairs, "
                     f"{rate_text(r['rate'])} [{rate_text(r['rate_ci95'][0])}, {rate_text(r['rate_ci95'][1])}])"
                     for arm, n, r in found)


def table_body(rates: Mapping[str, Mapping[Any, Mapping[str, Any]]], means: Mapping[str, Mapping[Any, float]],
               names: Mapping[str, str]) -> List[List[str]]:
    """Rows of the exchange-rate table: arm, n_real, mean Dice, real pairs needed, rate."""
    body = []
    for arm, per_n in rates.items():
        for n, r in per_n.items():
            dice = means.get(arm, {}).get(n)
            body.append([names.get(arm, arm), _short(float(n)),
                         fmt(dice),
                         f"{show(r['n_equivalent'])} [{show(r['ci95'][0])}, {show(r['ci95'][1])}]",
                         f"{rate_text(r['rate'])} [{rate_text(r['rate_ci95'][0])}, {rate_text(r['rate_ci95'][1])}]"
                         + (" ▲" if r["supported_above_1"] else " ▼" if r["supported_below_1"] else "")])
    return body


def budgets_of(values: Optional[Sequence[Any]]) -> List[float]:
    """Numeric budgets, sorted."""
    out = set()
    for v in values or []:
        try:
            out.add(float(v))
        except (TypeError, ValueError):
            continue
    return sorted(out)
