"""``meddiffaug table``: the paper tables in ``results.md``, regenerated from MLflow runs.

A table is data (``experiments/tables/*.yaml``): which grid's runs to read, how to group them
into rows, which metrics to show, which row every other row is compared with (paired by seed),
and which rows are *pending* (real datasets that need a GPU and a data folder; they show the
command that fills them, never a number no run produced). Only FINISHED runs count.

    meddiffaug table experiments/tables/diffaug_main.yaml [more.yaml ...] \
        --write results.md --json results.json [--tracking-uri URI] [--no-log]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd
from omegaconf import OmegaConf

from experiments.config import ConfigError
from experiments.reporting.stats import jsonable, paired_difference, summarize
from experiments.reporting.table_render import (COLLAPSE_METRIC, GATE_METRIC, GATE_REJECT_METRICS,  # noqa: F401
                                      render_markdown_table, render_section)

SPEC_KEYS = {"title", "grid", "command", "rows", "columns", "baseline", "compare", "filter",
             "pending", "plot", "headline", "headline_rows", "dataset", "n_real", "notes",
             "gate_min_real_pass", "gate_min_real_reject", "samples"}


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
    """Read and normalise a table YAML; unknown keys are errors (a typo must not pass)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Table file '{path}' does not exist; see experiments/tables/*.yaml.")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown or "grid" not in spec or "columns" not in spec:
        raise ConfigError(f"{path}: unknown keys {unknown} or missing 'grid'/'columns'; "
                          f"valid keys: {', '.join(sorted(SPEC_KEYS))}.")
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
    spec.setdefault("command", f"meddiffaug grid sweeps/grids/{spec['grid']}.yaml && "
                               f"meddiffaug table {path} --write results.md")
    spec["id"] = path.stem
    return spec


def collect_runs(grid: str, tracking_uri: Optional[str] = None,
                 filter: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
    """FINISHED runs of a grid (tag ``grid=<name>`` in the experiment ``<name>``).

    Args:
        grid: grid name (MLflow experiment and ``grid`` tag).
        tracking_uri: MLflow store; default ``$MLFLOW_TRACKING_URI`` or the config default.
        filter: key -> value every run must match (tags by default; see :func:`column_of`).

    Returns:
        One row per run as ``mlflow.search_runs`` gives it (``tags.*``, ``metrics.*``,
        ``params.*``); when a cell was rerun only its latest run is kept. Empty if none.
    """
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
    for key, value in (filter or {}).items():  # numeric YAML values match "0.7" == "0.70"
        col = column_of(key)
        df = df[df[col].map(canon) == canon(value)] if col in df else df.iloc[0:0]
    if "tags.cell" in df and len(df):
        df = df.sort_values("start_time").drop_duplicates("tags.cell", keep="last")
    return df.reset_index(drop=True)


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


def build_table(spec: Dict[str, Any], runs: pd.DataFrame) -> Dict[str, Any]:
    """Aggregate runs into rows: per-metric summaries, collapse counts, gate flags, Δs.

    Args:
        spec: a table spec from :func:`load_table`.
        runs: the grid's runs from :func:`collect_runs`.

    Returns:
        ``{id, title, grid, command, n_runs, rows, baseline_names, pooled, pending, notes}``;
        each row holds ``key``, ``label``, ``n``, ``seeds``, ``metrics`` (metric ->
        :func:`~experiments.reporting.stats.summarize`), ``by_seed``, ``collapsed``, ``gate_warning`` and
        ``vs`` (one entry per baseline: its label and the paired differences per metric).
    """
    by_cols = [column_of(b) for b in spec["rows"]["by"]]
    metrics = list(dict.fromkeys([c["metric"] for c in spec["columns"]] + spec["compare"]
                                 + [GATE_METRIC, *GATE_REJECT_METRICS, COLLAPSE_METRIC]))
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
        frame = pd.DataFrame(groups[key])
        seeds = [canon(s) for s in frame.get("tags.seed", pd.Series([None] * len(frame)))]
        row = {"key": list(key), "label": _label(spec, key), "n": len(frame),
               "seeds": sorted(set(seeds), key=lambda s: (len(s), s)), "metrics": {}, "by_seed": {}}
        pooled |= len(set(seeds)) < len(seeds)
        for m in metrics:
            values = list(frame[f"metrics.{m}"]) if f"metrics.{m}" in frame else []
            row["metrics"][m] = summarize(values)
            per_seed: Dict[str, list] = {}
            for seed, value in zip(seeds, values):
                if pd.notna(value):
                    per_seed.setdefault(seed, []).append(float(value))
            # Several cells per seed (an unfiltered axis) are averaged per seed before pairing.
            row["by_seed"][m] = {s: sum(v) / len(v) for s, v in per_seed.items()}
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
                                             "is_baseline": ref is row, "diff": diffs})
    names = spec["rows"]["names"]
    baseline_names = [" · ".join(str({canon(k): v for k, v in (names.get(b) or {}).items()}
                                     .get(canon(v), v)) for b, v in base.items())
                      for base in spec["baselines"]]
    return {"id": spec["id"], "title": spec["title"], "grid": spec["grid"],
            "baseline_names": baseline_names,
            "command": spec["command"], "n_runs": len(runs), "rows": rows, "pooled": pooled,
            "pending": spec.get("pending") or [], "notes": spec.get("notes")}


def _baseline_row(spec: Dict[str, Any], rows: List[dict], row: dict,
                  base: Dict[str, Any]) -> Optional[dict]:
    """The row that equals ``base`` on its keys and ``row`` on every other grouping key."""
    want = [canon(base[b]) if b in base else v for b, v in zip(spec["rows"]["by"], row["key"])]
    return next((r for r in rows if r["key"] == want and r["n"]), None)


def headline(spec: Dict[str, Any], table: Dict[str, Any], runs: pd.DataFrame) -> Dict[str, Any]:
    """The one-line answer: augmented vs real-only (and vs copy-paste), paired by seed."""
    names = spec.get("headline_rows") or {}
    find = lambda role: next((r for r in table["rows"]  # noqa: E731
                              if "/".join(r["key"]) == canon(names.get(role, role))), None)
    real, aug, cp = find("real_only"), find("augmented"), find("copy_paste")
    dice, fnr = "test/dice", "test/fnr_small"
    mean = lambda row, m: row["metrics"][m]["mean"] if row and m in row["metrics"] else None  # noqa: E731
    pair = lambda a, b: paired_difference(a["by_seed"][dice], b["by_seed"][dice]) if a and b else None  # noqa: E731
    gain, gain_cp = pair(aug, real), pair(aug, cp)
    param = lambda k: runs[k].dropna().iloc[0] if k in runs and runs[k].notna().any() else None  # noqa: E731
    n_real = param("params.data.n_real") or spec.get("n_real")
    return jsonable({
        "table": spec["id"], "dataset": param("params.data.name") or spec.get("dataset"),
        "n_real": int(n_real) if str(n_real).isdigit() else n_real,
        "seeds": gain["n"] if gain else 0,
        "dice_real_only": mean(real, dice), "dice_augmented": mean(aug, dice),
        "gain": gain["mean"] if gain else None,
        "gain_ci95": [gain["ci95_low"], gain["ci95_high"]] if gain else [None, None],
        "small_lesion_fnr_real_only": mean(real, fnr), "small_lesion_fnr_augmented": mean(aug, fnr),
        "dice_copy_paste": mean(cp, dice), "gain_vs_copy_paste": gain_cp["mean"] if gain_cp else None,
        "gain_vs_copy_paste_ci95": [gain_cp["ci95_low"], gain_cp["ci95_high"]] if gain_cp else [None, None],
    })


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _log_to_mlflow(paths: List[Path], uri: str) -> None:
    """Log the generated files to a run named "tables" in the experiment "tables"."""
    import mlflow

    from experiments.config import load_config

    mlflow.set_tracking_uri(uri)  # the store the tables were read from, even if env differs
    if mlflow.get_experiment_by_name("tables") is None:
        root = Path(load_config().tracking.artifact_root).resolve().as_uri()
        try:
            mlflow.create_experiment("tables", artifact_location=f"{root}/tables")
        except Exception:  # another process created it between the check and the create
            pass
    mlflow.set_experiment("tables")
    with mlflow.start_run(run_name="tables", tags={"stage": "table"}):
        for path in paths:
            mlflow.log_artifact(str(path))


def copy_sample_grid(spec: Dict[str, Any], runs: pd.DataFrame, dest: Path) -> Optional[Path]:
    """Copy the generate stage's ``grid.png`` (source | mask | generated | overlay) of one run next to
    ``results.md``: the lowest-seed finished run whose tags match ``spec["samples"]`` (e.g.
    ``{variant: synthetic_filtered}``). Returns the copy, or None when no such run or picture exists.
    """
    import shutil

    chosen = runs
    for key, value in spec["samples"].items():
        col = column_of(key)
        chosen = chosen[chosen[col].map(canon) == canon(value)] if col in chosen else chosen.iloc[0:0]
    if "tags.sig_generate" not in chosen or not len(chosen):
        return None
    chosen = chosen.assign(_seed=pd.to_numeric(chosen.get("tags.seed"), errors="coerce")).sort_values("_seed")
    for _, run in chosen.iterrows():
        root = run.get("params.artifacts_dir")
        root = root if isinstance(root, str) and root else "artifacts"
        picture = Path(root) / "generate" / str(run["tags.sig_generate"]) / "grid.png"
        if picture.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture, dest)
            return dest
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug table TABLE.yaml [...] [--write results.md] [--json results.json]``."""
    parser = argparse.ArgumentParser(prog="meddiffaug table", description=main.__doc__)
    parser.add_argument("tables", nargs="+", help="table YAMLs, e.g. experiments/tables/diffaug_main.yaml")
    parser.add_argument("--write", default=None, help="Markdown output (all tables, in order)")
    parser.add_argument("--json", default=None, help="JSON output with every number")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db")
    parser.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")
    args = parser.parse_args(argv)
    command = "meddiffaug table " + shlex.join(list(argv) if argv is not None else sys.argv[2:])
    specs = [load_table(p) for p in args.tables]  # a bad YAML fails before any store is touched
    uri = args.tracking_uri or default_tracking_uri()
    out_dir = Path(args.write or args.json or ".").parent
    sections, result, written = [], {"generated_by": command, "tables": {}}, []
    for spec in specs:
        runs = collect_runs(spec["grid"], uri, spec.get("filter"))
        table = build_table(spec, runs)
        plot = None
        if spec.get("plot") and len(runs) and (args.write or args.json):
            from experiments.reporting.plots import plot_from_spec

            keys = [spec["plot"]["x"]] + list(spec["plot"]["y"] if isinstance(spec["plot"]["y"], list) else [spec["plot"]["y"]])
            cols = {k: list(runs[column_of(k)]) if column_of(k) in runs else [] for k in keys}
            labels = {c["metric"]: c.get("name", c["metric"]) for c in spec["columns"]}
            labels[spec["rows"]["by"][0]] = spec["rows"]["header"]
            png = plot_from_spec(spec["plot"], cols, out_dir / f"{spec['id']}.png", spec["title"], labels)
            plot, written = (png.name, written + [png]) if png else (None, written)
        samples = None
        if spec.get("samples") and len(runs) and args.write:
            png = copy_sample_grid(spec, runs, out_dir / f"{spec['id']}_samples.png")
            samples, written = (png.name, written + [png]) if png else (None, written)
        sections.append(render_section(spec, table, plot, samples))
        result["tables"][spec["id"]] = jsonable({k: v for k, v in table.items()})
        if spec.get("headline"):
            result["headline"] = headline(spec, table, runs)
    text = "\n".join([f"<!-- generated by {command} ; do not edit -->",
                      f"Generated by `{command}` from MLflow runs; do not edit by hand.", ""]
                     + sections)
    if args.write:
        _atomic_write(Path(args.write), text)
        written.append(Path(args.write))
    else:
        print(text)
    if args.json:
        _atomic_write(Path(args.json), json.dumps(result, indent=2, sort_keys=False) + "\n")
        written.append(Path(args.json))
    if written and not args.no_log:
        _log_to_mlflow(written, uri)
    return 0
