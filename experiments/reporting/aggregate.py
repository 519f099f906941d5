"""Runs into table rows: per-metric summaries over seeds, collapse counts, gate flags, thin gate runs,
and every paired Δ with Holm's correction across the table."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import pandas as pd

from experiments.reporting.keys import (COLLAPSE_METRIC, CROSSFIT_METRIC, GATE_METRIC, GATE_REJECT_METRICS, SEG_PREFIXES,
                                       canon, column_of)
from experiments.reporting.spec import table_metrics
from experiments.reporting.stats import holm, mde_paired, paired_difference, summarize
from experiments.reporting.thin_runs import accepted_none, drawn_with_replacement

ALPHA = 0.05  # family-wise level of the bold marks (Holm within each table)


def _label(spec: Dict[str, Any], key: tuple) -> str:
    names = spec["rows"]["names"]
    parts = []
    for by, value in zip(spec["rows"]["by"], key):
        table = {canon(k): v for k, v in (names.get(by) or {}).items()}
        parts.append(str(table.get(value, value)))
    return " · ".join(parts)


def _row_sort(spec: Dict[str, Any], key: tuple) -> tuple:
    out = []
    for by, value in zip(spec["rows"]["by"], key):
        order = [canon(v) for v in spec["rows"]["order"].get(by) or []]
        rank = order.index(value) if value in order else len(order)
        try:
            out.append((rank, 0, float(value), value))
        except ValueError:
            out.append((rank, 1, 0.0, value))
    return tuple(out)


def validator_of(frame: pd.DataFrame) -> Optional[str]:
    """Which latent validator a row's runs used: ``prompted`` (this suite's, lesion prompt), ``plain``
    (DiffAug's), ``features`` (``validator.features=unet_decoder``), ``mixed``, or None when no latent gate
    ran (or the runs do not say).

    The gate's own metric ``gen/validator_prompted`` wins; else the ``validator.prompted`` param.
    """
    mode, method = frame.get("params.validator.mode"), frame.get("params.augment.method")
    if mode is None or (mode.astype(str) == "none").any() or (method is not None and (method == "standard").any()):
        return None
    features = frame.get("params.validator.features")
    if features is not None and (features.astype(str) == "unet_decoder").any():  # no prompt: its own kind
        return "features" if (features.astype(str) == "unet_decoder").all() else "mixed"
    flags = frame.get("metrics.gen/validator_prompted")
    if flags is not None and flags.notna().any():
        values = [bool(v >= 0.5) for v in flags.dropna()]
    elif "params.validator.prompted" in frame:
        values = [str(v).strip().lower() == "true" for v in frame["params.validator.prompted"].dropna()]
    else:
        return None
    return None if not values else "prompted" if all(values) else "plain" if not any(values) else "mixed"


def build_table(spec: Dict[str, Any], runs: pd.DataFrame) -> Dict[str, Any]:
    """Aggregate runs into rows: per-metric summaries, collapse counts, gate flags, Δs with Holm.

    Args:
        spec: a table spec from :func:`load_table`.
        runs: the grid's runs from :func:`collect_runs` (or :func:`gather_runs`).

    Returns:
        ``{id, title, grid, command, n_runs, rows, baseline_names, pooled, pending, notes,
        holm_family}``; each row holds ``key``, ``label``, ``n``, ``seeds``, ``metrics`` (metric ->
        :func:`~experiments.reporting.stats.summarize`), ``by_seed``, ``collapsed``, ``gate_warning``,
        ``validator`` and ``vs`` (one entry per baseline: its label and key and the paired
        differences per metric, each with ``p``, Holm's ``p_holm``, ``significant`` and ``mde80``).
    """
    by_cols = [column_of(b) for b in spec["rows"]["by"]]
    metrics = table_metrics(spec)
    if len(runs) and all(c in runs for c in by_cols):
        runs = runs.dropna(subset=by_cols)  # e.g. a parent run of the grid has no row tag
    else:
        runs = runs.iloc[0:0]
    groups: Dict[tuple, list] = {}
    for _, run in runs.iterrows():
        key = tuple(canon(run[c]) for c in by_cols)
        groups.setdefault(key, []).append(run)
    if len(by_cols) == 1:  # declared rows show up even before their runs exist
        for value in spec["rows"]["order"].get(spec["rows"]["by"][0]) or []:
            groups.setdefault((canon(value),), [])
    rows, pooled = [], False
    for key in sorted(groups, key=lambda k: _row_sort(spec, k)):
        everything = pd.DataFrame(groups[key])
        thin = accepted_none(everything)
        frame = everything[~thin]  # a run whose gate accepted nothing is not a result of that gate
        seeds = _seeds(frame)
        row = {"key": list(key), "label": _label(spec, key), "n": len(frame), "validator": validator_of(everything),
               "seeds": sorted(set(seeds), key=lambda s: (len(s), s)), "no_accept": int(thin.sum()),
               "seeds_no_accept": sorted(set(_seeds(everything[thin])), key=lambda s: (len(s), s)),
               "with_replacement": drawn_with_replacement(frame)}
        pooled |= len(set(seeds)) < len(seeds)
        # the segmenter's metrics come from the kept runs; the gate's own (gen/*) from every run it judged
        segmenter = [m for m in metrics if m.startswith(SEG_PREFIXES) or m == COLLAPSE_METRIC]
        source = {**{m: _aggregate(everything, [m]) for m in metrics if m not in segmenter},
                  **dict.fromkeys(segmenter, _aggregate(frame, segmenter))}
        row["metrics"] = {m: source[m]["metrics"][m] for m in metrics}
        row["by_seed"] = {m: source[m]["by_seed"][m] for m in metrics}
        if row["no_accept"]:  # the sensitivity line: the arm's numbers with those runs counted in
            row["all_runs"] = _aggregate(everything, metrics)
        collapsed = row["by_seed"][COLLAPSE_METRIC]
        row["collapsed"] = sum(1 for v in frame.get(f"metrics.{COLLAPSE_METRIC}", []) if v >= 0.5)
        row["seeds_collapsed"] = sorted(s for s, v in collapsed.items() if v >= 0.5)
        gate = row["metrics"][GATE_METRIC]["mean"]
        rejects = [row["metrics"][m]["mean"] for m in GATE_REJECT_METRICS]
        row["gate_warning"] = bool(gate == gate and gate < spec["gate_min_real_pass"]) or any(
            r == r and r < spec["gate_min_real_reject"] for r in rejects)
        folds = everything.get(f"metrics.{CROSSFIT_METRIC}", pd.Series(dtype=float)).max()
        if folds == folds and folds > 0:  # which real pairs the gate's rates rest on (only then: old tables unchanged)
            row["gate_crossfit_folds"] = int(folds)
        rows.append(row)
    for base in spec["baselines"]:
        for row in rows:
            ref = _baseline_row(spec, rows, row, base)
            diffs = {m: paired_difference(row["by_seed"][m], ref["by_seed"][m]) if ref else None
                     for m in spec["compare"]}
            row.setdefault("vs", []).append({"baseline": ref["label"] if ref else None,
                                             "baseline_key": "/".join(canon(v) for v in base.values()),
                                             "ref_key": ref["key"] if ref else None,
                                             "is_baseline": ref is row, "diff": diffs})
            if "all_runs" in row and ref is not None and ref is not row:
                row["all_runs"].setdefault("vs", []).append(
                    {"baseline": ref["label"], "diff": {m: paired_difference(row["all_runs"]["by_seed"][m], ref["by_seed"][m])
                                                        for m in spec["compare"]}})
    names = spec["rows"]["names"]
    baseline_names = [" · ".join(str({canon(k): v for k, v in (names.get(b) or {}).items()}
                                     .get(canon(v), v)) for b, v in base.items())
                      for base in spec["baselines"]]
    return {"id": spec["id"], "title": spec["title"], "grid": spec["grid"],
            "baseline_names": baseline_names, "holm_family": _holm_marks(rows),
            "command": spec["command"], "n_runs": len(runs), "rows": rows, "pooled": pooled,
            "pending": spec.get("pending") or [], "notes": spec.get("notes")}


def _seeds(frame: pd.DataFrame) -> List[str]:
    return [canon(s) for s in frame.get("tags.seed", pd.Series([None] * len(frame)))]


def _aggregate(frame: pd.DataFrame, metrics: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``{metrics: {m: summary}, by_seed: {m: {seed: value}}}`` of the runs in ``frame``."""
    seeds = _seeds(frame)
    out: Dict[str, Dict[str, Any]] = {"metrics": {}, "by_seed": {}}
    for m in metrics:
        values = list(frame[f"metrics.{m}"]) if f"metrics.{m}" in frame else []
        out["metrics"][m] = summarize(values)
        per_seed: Dict[str, list] = {}
        for seed, value in zip(seeds, values):
            if pd.notna(value):
                per_seed.setdefault(seed, []).append(float(value))
        # Several cells per seed (an unfiltered axis) are averaged per seed before pairing.
        out["by_seed"][m] = {s: sum(v) / len(v) for s, v in per_seed.items()}
    return out


def _holm_marks(rows: List[dict]) -> int:
    """Holm-correct every paired Δ of one table together; returns the family size.

    A comparison listed twice (A vs B and B vs A, when both are baselines) is one test, counted once.
    Each Δ's ``mde80`` is then taken at Holm's strictest step, α / m (:func:`mde_alpha`): the level
    the smallest p must reach to be bold, so the MDE states the power of the marks the table prints.
    """
    family: Dict[tuple, list] = {}
    for row in rows:
        for vs in row.get("vs", []):
            for metric, diff in vs["diff"].items():
                if diff is not None and not vs["is_baseline"]:
                    pair = frozenset([tuple(row["key"]), tuple(vs["ref_key"] or ())])
                    family.setdefault((pair, metric), []).append(diff)
    tests = list(family.values())
    adjusted = holm([same[0]["p"] for same in tests])
    m = sum(p == p for p in adjusted)
    for same, p in zip(tests, adjusted):
        for diff in same:
            diff["p_holm"], diff["significant"] = p, bool(p == p and p <= ALPHA)
            diff["mde80"], diff["mde80_alpha"] = mde_paired(diff["std"], diff["n"], alpha=mde_alpha(m)), mde_alpha(m)
    return m


def mde_alpha(family: int) -> float:
    """The two-sided level at which a table's MDE80 is stated: Holm's strictest step α / m."""
    return ALPHA / max(int(family), 1)


def _baseline_row(spec: Dict[str, Any], rows: List[dict], row: dict,
                  base: Dict[str, Any]) -> Optional[dict]:
    """The row that equals ``base`` on its keys and ``row`` on every other grouping key."""
    want = [canon(base[b]) if b in base else v for b, v in zip(spec["rows"]["by"], row["key"])]
    return next((r for r in rows if r["key"] == want and r["n"]), None)
