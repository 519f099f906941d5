"""``meddiffaug table``: the paper tables in ``results.md``, regenerated from finished grid runs.

A table is data (``experiments/tables/*.yaml``): which grid's runs to read, how to group them
into rows, which metrics to show, which row every other row is compared with (paired by seed),
and which rows are *pending* (real datasets that need a GPU and a data folder; they show the
command that fills them, never a number no run produced). Only FINISHED runs count. The runs come
from MLflow, or with ``--runs`` from the run records the grid runner exports into the repository
(:mod:`experiments.reporting.run_records`); both give the same bytes.

    meddiffaug table experiments/tables/diffaug_main.yaml [more.yaml ...] \
        --write results.md --json results.json [--runs sweeps/records] [--tracking-uri URI] [--no-log]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
from omegaconf import OmegaConf

from experiments.config import ConfigError
from experiments.reporting import notes as note_tpl
from experiments.reporting.stats import holm, mde_paired, paired_difference, summarize
from experiments.reporting.table_render import COLLAPSE_METRIC, GATE_METRIC, GATE_REJECT_METRICS, SEG_PREFIXES
from experiments.reporting.thin_runs import accepted_none, drawn_with_replacement

SPEC_KEYS = {"title", "grid", "grids", "grid_key", "command", "rows", "columns", "baseline", "compare", "filter",
             "pending", "plot", "headline", "headline_rows", "dataset", "n_real", "notes", "note_metrics",
             "gate_min_real_pass", "gate_min_real_reject", "samples", "summary", "efficiency"}
SUMMARIES = {"headline_by_modality": {"by_modality"}, "data_efficiency": {"exchange"}}  # their note names
ALPHA = 0.05  # family-wise level of the bold marks (Holm within each table)


def canon(value: Any) -> str:
    """Canonical text of a tag value, so YAML ``0.7``/``3`` match tags ``"0.7"``/``"3.0"``."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return repr(int(number)) if number.is_integer() else repr(number)


def column_of(key: str) -> str:
    """DataFrame column of a key: ``params.*``/``metrics.*`` as given, a metric if it has a
    ``/`` (``test/dice``), otherwise a tag (``variant``, ``axis.augment.ratio``)."""
    if key.startswith(("params.", "metrics.", "tags.")):
        return key
    return f"metrics.{key}" if "/" in key else f"tags.{key}"


def load_table(path: str | Path) -> Dict[str, Any]:
    """Read and normalise a table YAML; unknown keys and unknown note names are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Table file '{path}' does not exist; see experiments/tables/*.yaml.")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown or not ("grid" in spec or "grids" in spec) or "columns" not in spec:
        raise ConfigError(f"{path}: unknown keys {unknown} or missing 'grid' (or 'grids')/'columns'; "
                          f"valid keys: {', '.join(sorted(SPEC_KEYS))}.")
    if spec.get("summary") is not None and spec["summary"] not in SUMMARIES:
        raise ConfigError(f"{path}: summary '{spec['summary']}' is unknown; use one of {', '.join(SUMMARIES)}.")
    grids = spec.get("grids")  # {label: grid}: one table over several grids, e.g. one per modality
    spec["sources"] = [(str(k), str(v)) for k, v in grids.items()] if grids else [(None, str(spec["grid"]))]
    spec.setdefault("grid", ", ".join(g for _, g in spec["sources"]))
    rows = spec.get("rows") or {"by": "variant"}
    rows = {"by": rows} if isinstance(rows, str) else dict(rows)
    by = [rows["by"]] if isinstance(rows["by"], str) else list(rows["by"])
    single = len(by) == 1  # order/names may be given flat for one key, per key otherwise
    rows["by"] = by
    rows["order"] = {by[0]: rows.get("order") or []} if single else rows.get("order") or {}
    rows["names"] = {by[0]: rows.get("names") or {}} if single else rows.get("names") or {}
    rows.setdefault("header", by[0].split(".")[-1] if single else " · ".join(b.split(".")[-1] for b in by))
    spec["rows"] = rows
    spec["columns"] = [{"metric": c, "name": c} if isinstance(c, str) else dict(c)
                       for c in spec["columns"]]
    base = spec.get("baseline")
    base = [] if base is None else base if isinstance(base, list) else [base]
    spec["baselines"] = [b if isinstance(b, dict) else {by[-1]: b} for b in base]
    spec["compare"] = spec.get("compare") or [spec["columns"][0]["metric"]]
    spec.setdefault("title", spec["grid"])
    grid_cmd = " && ".join(f"meddiffaug grid sweeps/grids/{g}.yaml" for _, g in spec["sources"])
    spec.setdefault("command", f"{grid_cmd} && meddiffaug table {path} --write outputs/{path.stem}.md")
    spec["id"], spec["path"] = path.stem, str(path)
    _check_note_names(spec)
    return spec


def table_metrics(spec: Dict[str, Any]) -> List[str]:
    """Every metric a table aggregates: columns, compared, note-only, gate and collapse metrics."""
    return list(dict.fromkeys([c["metric"] for c in spec["columns"]] + spec["compare"]
                              + list(spec.get("note_metrics") or [])
                              + [GATE_METRIC, *GATE_REJECT_METRICS, COLLAPSE_METRIC]))


def _check_note_names(spec: Dict[str, Any]) -> None:
    metrics = table_metrics(spec)
    known = note_tpl.BASE_NAMES | {a for m in metrics if (a := note_tpl.metric_alias(m, metrics))}
    known |= SUMMARIES.get(spec.get("summary"), set())
    bad = sorted(note_tpl.field_roots(spec.get("notes") or "") - known)
    if bad:
        raise ConfigError(f"{spec['path']}: notes use unknown names {bad}; known: {', '.join(sorted(known))} "
                          f"(add a metric to note_metrics to quote it).")


def select_runs(df: pd.DataFrame, filter: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
    """What the tables keep of a grid's FINISHED runs, from MLflow or from records alike: runs with the
    final metric, matching ``filter``, the latest run per cell, ordered by start time then run id."""
    if "metrics.test/dice" in df:  # a status is a claim; the final stage's metric is the fact
        df = df[df["metrics.test/dice"].notna()]
    for key, value in (filter or {}).items():  # numeric YAML values match "0.7" == "0.70"
        col = column_of(key)
        df = df[df[col].map(canon) == canon(value)] if col in df else df.iloc[0:0]
    if len(df) and "start_time" in df:  # one order for both sources: means then agree to the last bit
        df = df.sort_values(["start_time", "run_id"], kind="mergesort")
    if "tags.cell" in df and len(df):
        df = df.drop_duplicates("tags.cell", keep="last")
    return df.reset_index(drop=True)


def collect_runs(grid: str, tracking_uri: Optional[str] = None, filter: Optional[Dict[str, Any]] = None,
                 records: Optional[Sequence[Dict[str, Any]]] = None) -> pd.DataFrame:
    """FINISHED runs of a grid (tag ``grid=<name>`` in the experiment ``<name>``).

    Args:
        grid: grid name (MLflow experiment and ``grid`` tag).
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or the config default.
        filter: key -> value every run must match (tags by default; see :func:`column_of`).
        records: run records (:func:`~experiments.reporting.run_records.read_records`); when
            given, MLflow is not read.

    Returns:
        One row per run as ``mlflow.search_runs`` gives it (``tags.*``, ``metrics.*``,
        ``params.*``); when a cell was rerun only its latest run is kept. Empty if none.
    """
    if records is not None:
        from experiments.reporting.run_records import runs_frame

        df = runs_frame(records, grid)  # records hold FINISHED runs of their grid only
        return select_runs(df, filter)
    import mlflow

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    if mlflow.get_experiment_by_name(grid) is None:
        return pd.DataFrame()
    clauses = [f"tags.grid = '{grid}'", "attributes.status = 'FINISHED'"]
    for key, value in (filter or {}).items():  # exact strings go to the server; numbers below
        col = column_of(key)
        if isinstance(value, str) and not col.startswith("metrics."):
            kind, name = col.split(".", 1)
            clauses.append(f"{kind}.`{name}` = '{value}'")
    df = mlflow.search_runs(experiment_names=[grid], filter_string=" and ".join(clauses),
                            output_format="pandas")
    return select_runs(df, filter)


def gather_runs(spec: Dict[str, Any], tracking_uri: Optional[str] = None,
                records: Optional[Sequence[Dict[str, Any]]] = None) -> pd.DataFrame:
    """The runs of every grid a table reads; with ``grids:`` each run gets the tag ``grid_key``
    (e.g. ``modality``) set to its grid's label, so rows can group by it."""
    frames = []
    for label, grid in spec["sources"]:
        df = collect_runs(grid, tracking_uri, spec.get("filter"), records)
        if label is not None and len(df):
            df = df.assign(**{f"tags.{spec.get('grid_key', 'group')}": label})
        frames.append(df)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0] if frames else pd.DataFrame()


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the config default, exactly as the pipeline resolves it."""
    from experiments.config import load_config
    from experiments.tracking import tracking_uri

    return tracking_uri(load_config())


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
    """Which latent validator a row's runs used: ``prompted`` (this suite's, lesion prompt) or ``plain``
    (DiffAug's), ``mixed``, or None when no latent gate ran (or the runs do not say).

    The gate's own metric ``gen/validator_prompted`` wins; else the ``validator.prompted`` param.
    """
    mode, method = frame.get("params.validator.mode"), frame.get("params.augment.method")
    if mode is None or (mode.astype(str) == "none").any() or (method is not None and (method == "standard").any()):
        return None
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
        row["gate_warning"] = bool(gate == gate and gate < spec.get("gate_min_real_pass", 0.8)) or any(
            r == r and r < spec.get("gate_min_real_reject", 0.5) for r in rejects)
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


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug table TABLE.yaml [...] [--write results.md] [--json results.json] [--runs RECORDS ...]``."""
    from experiments.reporting.table_cli import main as run

    return run(argv)
