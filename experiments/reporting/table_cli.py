"""``meddiffaug table``: the paper tables in ``results.md``, regenerated from finished grid runs.

The last link of the reporting chain: spec (:mod:`~experiments.reporting.spec`) → runs
(:mod:`~experiments.reporting.sources`, MLflow or the committed run records) → rows and statistics
(:mod:`~experiments.reporting.aggregate`, :mod:`~experiments.reporting.summaries`) → Markdown
(:mod:`~experiments.reporting.table_render`) → this command. Only FINISHED runs count.

    meddiffaug table experiments/tables/diffaug_main.yaml [more.yaml ...] \
        --write outputs/tables.md --json outputs/tables.json [--runs sweeps/records] [--tracking-uri URI] [--no-log]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from datamodules.io import atomic_write_text
from experiments.reporting import findings
from experiments.reporting.completeness import DefinedCells, interim_finding, unfinished_grids
from experiments.reporting.stats import jsonable, published
from experiments.reporting.aggregate import build_table
from experiments.reporting.keys import column_of
from experiments.reporting.sources import gather_runs, memo_collect_runs
from experiments.reporting.spec import load_table
from experiments.reporting.store import default_tracking_uri
from experiments.reporting.table_render import render_section

# Options that say where the runs come from, not what is generated: left out of the command shown in
# results.md, so the MLflow store and the exported records give the same bytes.
SOURCE_OPTIONS = {"--runs": "many", "--tracking-uri": 1, "--no-log": 0}


def shown_command(argv: List[str]) -> str:
    """``meddiffaug table …`` as results.md shows it: ``argv`` without the source options."""
    kept, skip_many, i = [], False, 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name in SOURCE_OPTIONS:
            n = SOURCE_OPTIONS[name]
            skip_many = n == "many" and "=" not in token
            i += 1 + (n if isinstance(n, int) and "=" not in token else 0)
            continue
        if skip_many and not token.startswith("-"):
            i += 1
            continue
        skip_many = False
        kept.append(token)
        i += 1
    return "meddiffaug table " + shlex.join(kept)


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


def _plot(spec: Dict[str, Any], runs: Any, out_dir: Path) -> Optional[Path]:
    from experiments.reporting.plots import plot_from_spec

    keys = [spec["plot"]["x"]] + list(spec["plot"]["y"] if isinstance(spec["plot"]["y"], list) else [spec["plot"]["y"]])
    cols = {k: list(runs[column_of(k)]) if column_of(k) in runs else [] for k in keys}
    labels = {c["metric"]: c.get("name", c["metric"]) for c in spec["columns"]}
    labels[spec["rows"]["by"][0]] = spec["rows"]["header"]
    return plot_from_spec(spec["plot"], cols, out_dir / f"{spec['id']}.png", spec["title"], labels)


def _finished_ids(fetch: Callable) -> Any:
    """grid name -> the cell ids of its FINISHED runs (no table filter: the whole grid)."""
    def ids(grid: str) -> List[str]:
        df = fetch(grid, None)
        return list(df["tags.cell"].dropna()) if "tags.cell" in df else []

    return ids


def main(argv: Optional[List[str]] = None, defined_cells: Optional[DefinedCells] = None) -> int:
    """``meddiffaug table TABLE.yaml [...] [--write results.md] [--json results.json] [--runs RECORDS ...]``.

    ``defined_cells`` (grid name -> its cell ids) lets the output say when a grid has not finished.
    """
    parser = argparse.ArgumentParser(prog="meddiffaug table", description=main.__doc__)
    parser.add_argument("tables", nargs="+", help="table YAMLs, e.g. experiments/tables/diffaug_main.yaml")
    parser.add_argument("--write", default=None, help="Markdown output (all tables, in order)")
    parser.add_argument("--json", default=None, help="JSON output with every number")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RECORDS",
                        help="read the runs from exported run records (sweeps/records/<grid>.jsonl files or "
                             "the folder sweeps/records) instead of MLflow; nothing is logged to MLflow then")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db")
    parser.add_argument("--no-log", action="store_true", help="do not log the outputs to MLflow")
    args = parser.parse_args(argv)
    command = shown_command(list(argv) if argv is not None else sys.argv[2:])
    specs = [load_table(p) for p in args.tables]  # a bad YAML fails before any store is touched
    records = None
    if args.runs:
        from experiments.reporting.run_records import read_records

        records = read_records(args.runs)
    uri = None if records is not None else args.tracking_uri or default_tracking_uri()
    if uri is not None:
        from experiments.tracking import require_server

        require_server(uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI")
    out_dir = Path(args.write or args.json or ".").parent
    sections, result, written = [], {"generated_by": command, "tables": {}}, []
    fetch = memo_collect_runs(uri, records)
    unfinished = unfinished_grids(specs, _finished_ids(fetch), defined_cells)
    if unfinished:  # only then: a finished table's files stay what they were
        result["unfinished_grids"] = unfinished
    found = interim_finding(unfinished)
    for spec in specs:
        runs = gather_runs(spec, fetch)
        table = build_table(spec, runs)
        plot, samples, extra = None, None, None
        if spec.get("summary"):
            from experiments.reporting import summaries

            extra = summaries.build(spec, table, runs, out_dir if (args.write or args.json) else None)
            result.update(extra["json"])
            found += extra.get("findings") or []
            if extra.get("plot"):
                plot, written = extra["plot"].name, written + [extra["plot"]]
        elif spec.get("plot") and len(runs) and (args.write or args.json):
            png = _plot(spec, runs, out_dir)
            plot, written = (png.name, written + [png]) if png else (None, written)
        if spec.get("samples") and len(runs) and args.write:
            from experiments.reporting.headlines import copy_sample_grid

            png = copy_sample_grid(spec, runs, out_dir / f"{spec['id']}_samples.png")
            samples, written = (png.name, written + [png]) if png else (None, written)
        sections.append(render_section(spec, table, plot, samples, extra))
        result["tables"][spec["id"]] = jsonable({k: v for k, v in table.items()})
        if spec.get("headline"):
            from experiments.reporting.headlines import headline

            result["headline"] = headline(spec, table, runs)
    text = "\n".join([f"<!-- generated by {command} ; do not edit -->",
                      f"Generated by `{command}` from the finished grid runs: `make results` reads them from the run "
                      "records committed in `sweeps/records/` (`--runs sweeps/records`), without `--runs` they come "
                      "from the MLflow store; do not edit by hand.", ""]
                     + findings.render(found) + sections)
    if args.write:
        atomic_write_text(Path(args.write), text)
        written.append(Path(args.write))
    else:
        print(text)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(published(result), indent=2, sort_keys=False) + "\n")
        written.append(Path(args.json))
    if written and not args.no_log and uri is not None:
        _log_to_mlflow(written, uri)
    return 0
