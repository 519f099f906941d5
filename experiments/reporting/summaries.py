"""Summary blocks of tables with ``summary:``: their ``results.json`` key, extra Markdown, plot, note names.

* ``headline_by_modality``: see :func:`experiments.reporting.headlines.by_modality`.
* ``data_efficiency``: Dice against the label budget per arm (plot on a log axis), and the exchange
  rate of every augmented arm (:mod:`experiments.reporting.efficiency`). The spec's
  ``efficiency: {budget, arm, reference, metric}`` names the budget key (default
  ``params.data.n_real``, so an axis or a variant per budget both work), the arm key (``variant``),
  the real-only arm and the metric (``test/dice``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import pandas as pd

from experiments.reporting import efficiency as eff
from experiments.reporting import findings
from experiments.reporting.keys import canon
from experiments.reporting.table_render import render_markdown_table

EFFICIENCY_DEFAULTS = {"budget": "params.data.n_real", "arm": "variant", "reference": "real_only",
                       "metric": "test/dice"}


def build(spec: Dict[str, Any], table: Dict[str, Any], runs: pd.DataFrame, out_dir: Optional[Path]) -> Dict[str, Any]:
    """``{"json": {...}, "markdown": [...], "pending": [...], "notes": {...}, "plot": Path | None}``."""
    if spec["summary"] == "headline_by_modality":
        from experiments.reporting.headlines import by_modality

        return by_modality(spec, table, runs)
    return data_efficiency(spec, table, out_dir)


def data_efficiency(spec: Dict[str, Any], table: Dict[str, Any], out_dir: Optional[Path]) -> Dict[str, Any]:
    """The ``data_efficiency`` block: budgets, seeds, per-arm Dice lists, exchange rates, plot."""
    cfg = {**EFFICIENCY_DEFAULTS, **(spec.get("efficiency") or {})}
    by = spec["rows"]["by"]
    if by != [cfg["budget"], cfg["arm"]]:
        from experiments.config import ConfigError

        raise ConfigError(f"{spec['path']}: a data_efficiency table groups rows by [{cfg['budget']}, {cfg['arm']}] "
                          f"(budget, then arm); it has {by}.")
    metric = cfg["metric"]
    budgets = eff.budgets_of({r["key"][0] for r in table["rows"] if r["n"]})
    order = [canon(a) for a in spec["rows"]["order"].get(cfg["arm"]) or []]
    arms = sorted({r["key"][1] for r in table["rows"] if r["n"]}, key=lambda a: (order.index(a) if a in order else len(order), a))
    names = {canon(k): v for k, v in (spec["rows"]["names"].get(cfg["arm"]) or {}).items()}
    rows = {(float(r["key"][0]), r["key"][1]): r for r in table["rows"] if r["n"]}
    dice_by_seed = {a: {n: rows[(n, a)]["by_seed"][metric] if (n, a) in rows else {} for n in budgets} for a in arms}
    means = {a: {n: rows[(n, a)]["metrics"][metric]["mean"] if (n, a) in rows else None for n in budgets} for a in arms}
    ci = {a: {n: [rows[(n, a)]["metrics"][metric][k] for k in ("ci95_low", "ci95_high")] if (n, a) in rows else [None, None]
              for n in budgets} for a in arms}
    rates = eff.exchange_rates(dice_by_seed, canon(cfg["reference"]), budgets)
    as_int = lambda n: int(n) if float(n).is_integer() else n  # noqa: E731
    block = {"n_real": [as_int(n) for n in budgets], "seeds": rates["seeds"], "arms": arms, "metric": metric,
             "dice": {a: [means[a][n] for n in budgets] for a in arms},
             "dice_ci95": {a: [ci[a][n] for n in budgets] for a in arms},
             "exchange_rate": {a: {str(as_int(n)): r for n, r in per_n.items()} for a, per_n in rates["rates"].items()},
             "reference": canon(cfg["reference"]), "monotone_fixed": [as_int(n) for n in rates["monotone_fixed"]],
             "interval": {"method": "paired t-test inverted over the real-only curve", "family": rates["family"],
                          "level_each": rates["level"], "family_wise_alpha": eff.ALPHA, "correction": "Bonferroni"}}
    pending, markdown, plot = [], [], None
    sentence = eff.sentence(rates["rates"], names, rates["family"])
    if budgets and rates["rates"]:
        ref_name = names.get(canon(cfg["reference"]), cfg["reference"])
        header = ["Arm", "n_real", "Dice (mean)", f"Real pairs {ref_name} needs for that Dice [simultaneous 95 % CI]",
                  "Exchange rate (× n_real) [simultaneous 95 % CI]"]
        fixed = rates["monotone_fixed"]
        markdown = [render_markdown_table(header, eff.table_body(rates["rates"], means, names)), "",
                    f"Exchange rate: the real-only mean Dice curve interpolated linearly in log n_real and inverted "
                    f"(never extrapolated: outside {eff._short(budgets[0])}–{eff._short(budgets[-1])} it reads "
                    f"\"less than\"/\"more than\"); interval: the real-only budgets n' whose paired t-test "
                    f"(the arm at n against real only interpolated at n', over the {len(rates['seeds'])} seeds complete "
                    f"in every cell) does not reject, at level {100 * rates['level']:.2f} % each so that the "
                    f"{rates['family']} intervals hold together at 95 % (Bonferroni); it excludes 1 exactly when the "
                    "paired t-test of the arm's Dice Δ vs real only rejects at that level. ▲: the interval lies above "
                    "1, ▼: below 1. "
                    + (f"The real-only curve dips (mean Dice at n_real = {', '.join(eff._short(n) for n in fixed)} below "
                       "a smaller budget); it is made monotone by a running maximum (cummax) before inverting."
                       if fixed else "The real-only curve rises monotonically; no correction was needed."), ""]
    if out_dir is not None and budgets:
        from experiments.reporting.plots import budget_plot

        series = {names.get(a, a): [(n, rows[(n, a)]["metrics"][metric]) for n in budgets if (n, a) in rows] for a in arms}
        plot = budget_plot(series, out_dir / f"{spec['id']}.png", spec["rows"]["header"].split(" · ")[0], "Dice", spec["title"])
    return {"json": {"data_efficiency": block}, "markdown": markdown, "pending": pending, "plot": plot,
            "notes": {"exchange": sentence}, "findings": findings.efficiency(sentence)}
