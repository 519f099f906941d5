"""Gate runs too thin to be gate results: which runs accepted no synthetic pair, and which drew their
synthetic pairs with replacement because the gate accepted fewer than the ratio asks for.

A run whose gate accepted nothing trained its segmenter on real pairs alone: averaging it into the
gate arm would credit (or blame) the gate for a real-only result. It is left out of the arm's mean,
counted and marked, and a sensitivity line gives the arm's numbers with it. A run that accepted fewer
pairs than it draws (``round(augment.ratio × training pairs)``) repeats its few accepted pairs, which
the reader should know when a gate arm differs from the no-gate arm.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import pandas as pd

ACCEPTED_METRIC = "gen/n_accepted"


def accepted_none(frame: pd.DataFrame) -> pd.Series:
    """True for runs whose validate stage logged that it accepted no pair (a missing count is False).

    Args:
        frame: one row per run (``metrics.*`` and ``params.*`` columns).

    Returns:
        A boolean Series aligned with ``frame``.
    """
    column = f"metrics.{ACCEPTED_METRIC}"
    if column not in frame:
        return pd.Series(False, index=frame.index)
    counts = pd.to_numeric(frame[column], errors="coerce")
    return counts.notna() & (counts < 0.5)  # a count: 0 whatever the last bit says


def pairs_drawn(run: pd.Series) -> float:
    """``round(augment.ratio × (data.n_real − data.n_val))``: the synthetic pairs a run draws; NaN when
    its params do not say (no ratio, no integer n_val, or a run without synthetic pairs)."""
    try:
        ratio, n_real = float(run.get("params.augment.ratio")), float(run.get("params.data.n_real"))
        n_val = float(run.get("params.data.n_val"))
    except (TypeError, ValueError):
        return math.nan
    if not all(math.isfinite(v) for v in (ratio, n_real, n_val)) or n_val < 1:
        return math.nan
    return float(round(ratio * (n_real - n_val)))


def drawn_with_replacement(frame: pd.DataFrame) -> List[Tuple[int, int]]:
    """``(accepted, drawn)`` of every run that accepted at least one pair but fewer than it draws."""
    column = f"metrics.{ACCEPTED_METRIC}"
    if column not in frame:
        return []
    out = []
    for _, run in frame.iterrows():
        accepted, drawn = pd.to_numeric(run[column], errors="coerce"), pairs_drawn(run)
        if pd.notna(accepted) and accepted >= 0.5 and math.isfinite(drawn) and round(accepted) < drawn:
            out.append((int(round(accepted)), int(drawn)))
    return sorted(out)
