"""Data efficiency: Dice against the label budget, and what a synthetic pair is worth in real pairs.

The **exchange rate** of an augmented arm at budget n is the number of real pairs real-only training
would need for the same mean Dice, read off the real-only curve interpolated linearly in log n
(:func:`numpy.interp` on the bracketing segment), divided by n. Where it falls outside the measured
budgets it is "more than <max>" / "less than <min>": the curve is never extrapolated. The real-only
curve must rise with n to be inverted; a noisy dip is removed by a running maximum (cummax, the
isotonic fit for a curve that may only rise or stay) and the table says so. The 95 % interval comes
from a bootstrap over seeds that resamples seed indices jointly across arms and budgets (the seeds
are paired), with a fixed generator seed so the same runs give the same bytes.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

N_BOOT = 2000
BOOT_SEED = 0  # fixed: results.md must be reproducible byte for byte


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


def _monotone(curve: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(curve, axis=0)


def exchange_rates(dice: Mapping[str, Mapping[float, Mapping[str, float]]], reference: str,
                   budgets: Sequence[float], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> Dict[str, Any]:
    """Exchange rates of every arm against ``reference``, with paired bootstrap intervals.

    Args:
        dice: arm -> budget -> seed -> Dice of that run.
        reference: the real-only arm.
        budgets: the budgets, increasing.
        n_boot: bootstrap replicates.
        seed: the bootstrap generator's seed.

    Returns:
        ``{seeds, monotone_fixed, rates: {arm: {budget: {...}}}}``: ``seeds`` are those present in
        every (arm, budget) cell (the only ones resampled); ``monotone_fixed`` lists the budgets
        where the real-only mean curve was raised by the running maximum; each rate holds
        ``n_equivalent`` and ``ci95`` (numbers, or "more than N"/"less than N"), ``rate`` and
        ``rate_ci95`` (n_equivalent / n), ``supported_above_1`` (the interval's low end > 1) and
        ``supported_below_1`` (its high end < 1: the arm is worth fewer real pairs than it holds).
    """
    arms = list(dice)
    seeds = sorted(set.intersection(*[set(dice[a][n]) for a in arms for n in budgets]) if arms else set(),
                   key=lambda s: (len(s), s))
    out: Dict[str, Any] = {"seeds": seeds, "monotone_fixed": [], "rates": {}}
    if len(seeds) < 2 or reference not in dice:
        return out
    values = np.array([[[dice[a][n][s] for s in seeds] for n in budgets] for a in arms])  # (arm, budget, seed)
    means = values.mean(axis=2)
    ref = arms.index(reference)
    curve = _monotone(means[ref])
    out["monotone_fixed"] = [n for n, raw, fixed in zip(budgets, means[ref], curve) if fixed > raw]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    boot = values[:, :, picks].mean(axis=3)  # (arm, budget, replicate)
    boot_curves = _monotone(boot[ref])  # (budget, replicate)
    lo_n, hi_n = float(budgets[0]), float(budgets[-1])
    for a, arm in enumerate(arms):
        if a == ref:
            continue
        out["rates"][arm] = {}
        for j, n in enumerate(budgets):
            point = n_equivalent(means[a, j], budgets, curve)
            reps = np.array([n_equivalent(boot[a, j, b], budgets, boot_curves[:, b]) for b in range(n_boot)])
            # inverted_cdf: an order statistic, never an interpolation between "0" and a budget or inf
            low, high = np.quantile(reps, [0.025, 0.975], method="inverted_cdf")
            out["rates"][arm][n] = {
                "n_equivalent": _text(point, lo_n, hi_n), "ci95": [_text(low, lo_n, hi_n), _text(high, lo_n, hi_n)],
                "rate": _text(point / n, lo_n / n, hi_n / n), "rate_ci95": [_text(low / n, lo_n / n, hi_n / n),
                                                                            _text(high / n, lo_n / n, hi_n / n)],
                "supported_above_1": bool(low / n > 1), "supported_below_1": bool(high / n < 1)}
    return out


def _text(value: float, low: float, high: float) -> Any:
    """A number inside the measured range; "more than <high>"/"less than <low>" outside it."""
    if value > high:
        return f"more than {_short(high)}"
    if value < low:
        return f"less than {_short(low)}"
    return float(value)


def _short(value: float) -> str:
    return f"{value:g}" if value >= 1 else f"{value:.2g}"


def show(value: Any, spec: str = ".1f") -> str:
    """A number or an out-of-range text, for a table cell."""
    return value if isinstance(value, str) else format(value, spec)


def rate_text(value: Any) -> str:
    """``×1.73`` for a measured rate, the out-of-range text (``more than 1``) otherwise."""
    return value if isinstance(value, str) else f"×{value:.2f}"


def sentence(rates: Mapping[str, Mapping[Any, Mapping[str, Any]]], names: Mapping[str, str]) -> str:
    """The note's sentence on the exchange rates, written from the numbers, whatever they say."""
    supported = [(arm, n, r) for arm, per_n in rates.items() for n, r in per_n.items() if r["supported_above_1"]]
    if not rates:
        return "No exchange rate could be computed (fewer than two seeds complete in every cell)."
    below = [(arm, n, r) for arm, per_n in rates.items() for n, r in per_n.items() if r["supported_below_1"]]
    if not supported:
        text = ("No exchange rate above 1 is supported: at every budget the 95 % bootstrap interval of every "
                "augmented arm reaches 1 or below, so these runs do not show that a synthetic-augmented run saves "
                "real labels.")
    else:
        text = "Exchange rates above 1 supported by the 95 % bootstrap interval: " + _listed(supported, names) + "."
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
                         "n/a" if dice is None or not math.isfinite(dice) else f"{dice:.3f}",
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
