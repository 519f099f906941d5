"""A block's pre-registered primary comparison: one arm against one control on one metric, per modality.

The table spec's ``primary: {arm, versus, metric}`` names it before the block runs. Each modality's
difference is paired by seed (a paired t-test, as every Δ of the tables), and the p-values are
Holm-adjusted within the modalities: the family the pre-registration fixes. A modality without runs
enters the family with p = 1, so an unmeasured modality never makes the others easier to pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

from experiments.reporting.keys import canon
from experiments.reporting.stats import fmt, holm, paired_difference

ALPHA = 0.05  # family-wise level of the primary comparison


def primary_comparison(spec: Dict[str, Any], table: Dict[str, Any], labels: List[str],
                       find: Callable[..., Optional[dict]]) -> Optional[Dict[str, Any]]:
    """The spec's primary comparison over ``labels`` (the modalities), or None without one.

    Args:
        find: ``find(table, arm, (canon(label),)) -> row or None`` (the table's row of an arm).

    Returns:
        ``{"arm", "versus", "metric", "alpha", "family", "by_modality": {label: {"mean", "ci95", "p",
        "p_holm", "n", "significant", "mde80"}}}``; a modality without paired seeds has None figures.
        ``mde80`` is the smallest true Δ a paired t-test finds with 80 % power at Holm's strictest step
        of this family (α / number of modalities), from the observed paired SD.
    """
    chosen = spec.get("primary")
    if not chosen:
        return None
    arm, versus, metric = chosen["arm"], chosen["versus"], chosen.get("metric", "test/dice")
    by_modality: Dict[str, Dict[str, Any]] = {}
    strictest = ALPHA / max(len(labels), 1)
    for label in labels:
        a, b = (find(table, name, (canon(label),)) for name in (arm, versus))
        diff = None
        if a and b and metric in a["by_seed"] and metric in b["by_seed"]:
            diff = paired_difference(a["by_seed"][metric], b["by_seed"][metric], mde_alpha=strictest)
        measured = bool(diff and diff["n"] >= 2)
        by_modality[label] = {"mean": diff["mean"] if measured else None,
                              "ci95": [diff["ci95_low"], diff["ci95_high"]] if measured else [None, None],
                              "p": diff["p"] if measured else None, "n": diff["n"] if diff else 0,
                              "mde80": diff["mde80"] if measured and math.isfinite(diff["mde80"]) else None}
    adjusted = holm([entry["p"] if entry["p"] is not None else 1.0 for entry in by_modality.values()])
    for entry, p_holm in zip(by_modality.values(), adjusted):
        entry["p_holm"] = p_holm if entry["p"] is not None else None
        entry["significant"] = None if entry["p"] is None else bool(p_holm <= ALPHA)
    return {"arm": arm, "versus": versus, "metric": metric, "alpha": ALPHA, "family": len(labels),
            "by_modality": by_modality}


def primary_markdown(primary: Dict[str, Any], preregistration: Optional[str],
                     amendments: Optional[List[str]] = None) -> List[str]:
    """One line per modality under the headline table: Δ [95 % CI], p and Holm-adjusted p."""
    amended = "".join(f", amended in `{path}`" for path in amendments or [])
    where = f" (pre-registered in `{preregistration}`{amended})" if preregistration else ""
    lines = [f"Primary comparison{where}: `{primary['arm']}` − `{primary['versus']}`, {primary['metric']}, "
             f"paired by seed, Holm over the {primary['family']} modalities at α = {primary['alpha']}:", ""]
    for label, e in primary["by_modality"].items():
        if e["mean"] is None:
            lines.append(f"* {label}: not measured")
            continue
        verdict = "significant" if e["significant"] else "not significant"
        low, high = (fmt(x, ".3f", True) for x in e["ci95"])
        lines.append(f"* {label}: Δ {fmt(e['mean'], '.3f', True)} [{low}, {high}], {e['n']} seeds, "
                     f"p = {fmt(e['p'], '.3g')}, Holm p = {fmt(e['p_holm'], '.3g')} ({verdict}); "
                     f"MDE80 {fmt(e['mde80'])}")
    return lines + ["", f"MDE80: the smallest true Δ found with 80 % power (paired t-test, the observed paired SD) "
                         f"at α = {primary['alpha']}/{primary['family']}, Holm's strictest step.", ""]
