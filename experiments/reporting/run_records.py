"""Run records: every finished grid cell as one JSON line in the repository.

The MLflow store (``outputs/``) is not committed, so without records the finished runs behind
``results.md`` would exist only where they ran and no other clone could rebuild a table. The grid
runner therefore exports each cell as it finishes to ``sweeps/records/<grid>.jsonl`` (beside the
grid definitions in ``sweeps/grids/``; not ``sweeps/runs/``, which would sit beside the module
``sweeps/runs.py``), and ``meddiffaug table … --runs sweeps/records/<grid>.jsonl`` builds the same
tables from it as from MLflow. ``meddiffaug grid`` counts an exported cell as done, so a long block
of seeds can stop and continue on any machine that has the committed records: commit the records,
not the store.

One record: ``{grid, cell, seed, variant, run_id, status, start_time (ms), git_sha, tags, params,
metrics, sigs}`` where ``tags`` are the run's tags (``mlflow.*`` left out), ``params`` the
resolved config flattened (``tracking.*`` left out: where a run was logged is no result),
``metrics`` the run's final values and ``sigs`` the stage signatures. A file holds one record per
cell: an export rewrites the file (temp file + rename, under a lock) with the cell's older
record replaced, so a cell exported twice appears once and the latest run of a cell wins, as in
the tables. Readers also keep the latest record per cell, so two branches' records merged with
git's ``union`` driver (``sweeps/records/.gitattributes``) still read right.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from datamodules.io import atomic_write_text

RECORDS_ENV = "MEDDIFFAUG_RECORDS_DIR"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
LEFT_OUT_PARAMS = ("tracking.",)
LOCK_TIMEOUT_S = 600.0


def records_dir() -> Path:
    """Where grids export: ``$MEDDIFFAUG_RECORDS_DIR``, else ``sweeps/records/`` of this checkout
    (the records belong in the repository whose code made them, whatever the working directory)."""
    env = os.environ.get(RECORDS_ENV)
    return Path(env) if env else PROJECT_ROOT / "sweeps" / "records"


def records_path(grid: str) -> Path:
    """The export file of one grid."""
    return records_dir() / f"{grid}.jsonl"


def _number(value: Any) -> Optional[float]:
    number = float(value)
    return number if math.isfinite(number) else None  # strict JSON: no NaN


def make_record(grid: str, cell: str, run_id: str, start_time_ms: int, status: str, tags: Mapping[str, Any],
                params: Mapping[str, Any], metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """A record from a run's parts (what :func:`record_of_run` reads back from MLflow)."""
    tags = {str(k): str(v) for k, v in tags.items() if not str(k).startswith("mlflow.")}
    return {"grid": grid, "cell": cell, "seed": tags.get("seed"), "variant": tags.get("variant"),
            "run_id": run_id, "status": status, "start_time": int(start_time_ms),
            "git_sha": tags.get("git_sha"),
            "tags": dict(sorted(tags.items())),
            "params": {str(k): str(v) for k, v in sorted(params.items()) if not str(k).startswith(LEFT_OUT_PARAMS)},
            "metrics": {str(k): _number(v) for k, v in sorted(metrics.items())},
            "sigs": {k[len("sig_"):]: v for k, v in sorted(tags.items()) if k.startswith("sig_")}}


def record_of_run(run_id: str, tracking_uri: Optional[str] = None) -> Dict[str, Any]:
    """Read a finished run back from MLflow: the record then holds exactly what a table reads there."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    tags = run.data.tags
    return make_record(tags.get("grid", ""), tags.get("cell", run_id), run_id, run.info.start_time,
                       run.info.status, tags, run.data.params, run.data.metrics)


def write_record(record: Mapping[str, Any], path: Path) -> Path:
    """Put ``record`` into ``path``, replacing any older record of the same cell (see :func:`write_records`)."""
    return write_records([record], path)


def write_records(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Merge ``records`` into ``path``: one record per cell, the latest run of each cell wins.

    The file is rewritten to a temp file and renamed over the old one while holding a lock, so a
    reader never sees half a line and two workers never lose each other's records. Writing the
    same run again changes nothing; an older run of a cell never replaces a newer one.
    """
    from experiments.cache.locks import stage_lock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with stage_lock(path.with_name(f".{path.name}.lock"), timeout_s=LOCK_TIMEOUT_S):
        old = read_records([path]) if path.is_file() else []
        merged = {(r["grid"], r["cell"]): r for r in old}
        changed = False
        for record in records:
            key = (record["grid"], record["cell"])
            if key not in merged or _order(record) > _order(merged[key]):
                merged.pop(key, None)  # re-inserted last: the file reads in export order
                merged[key] = dict(record)
                changed = True
        if changed:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in merged.values()))
    return path


def export_run(run_id: Optional[str], path: Optional[Path] = None, tracking_uri: Optional[str] = None,
               fallback: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
    """Export one finished grid cell; the grid runner calls this as a cell finishes.

    Args:
        run_id: the cell's MLflow run (None when tracking is disabled).
        path: export file; default :func:`records_path` of the run's grid.
        tracking_uri: the store the run is in; default the current one.
        fallback: ``{grid, cell, tags, params, metrics}`` to export when there is no MLflow run.

    Returns:
        The file written, or None when nothing finished (not FINISHED, or no record to make). An
        export that cannot be written prints why and what to do; it never fails the finished cell.
    """
    try:
        if run_id is not None:
            record = record_of_run(run_id, tracking_uri)
        elif fallback is not None:
            record = make_record(fallback["grid"], fallback["cell"], f"local-{fallback['cell']}-{time.time_ns()}",
                                 int(time.time() * 1000), "FINISHED", fallback["tags"], fallback["params"],
                                 fallback["metrics"])
        else:
            return None
        if record["status"] != "FINISHED" or not record["grid"]:
            return None
        return write_record(record, path or records_path(record["grid"]))
    except Exception as err:  # noqa: BLE001 - the cell is done and cached; only its record is missing
        print(f"[grid] could not export run {run_id} to {path or records_dir()}: {type(err).__name__}: {err}. "
              f"Make that folder writable (or set {RECORDS_ENV}), then export again with "
              f"`python -m experiments.reporting.run_records <grid>`.", flush=True)
        return None


def export_cell(cfg: Any, grid: str, cell: str, tags: Mapping[str, str], result: Any) -> Optional[Path]:
    """Export a grid cell that just finished (``result``: its :class:`~experiments.runner.pipeline.PipelineResult`).

    Only the process that logs to MLflow exports (rank 0 under a launcher). Without a tracked run
    (``tracking.enabled=false``) the record is made from the config, the cell's tags and the metrics.
    """
    from experiments import tracking

    if not tracking.is_rank_zero():
        return None
    if result.run_id is not None:
        return export_run(result.run_id, tracking_uri=tracking.tracking_uri(cfg))
    sig_tags = {f"sig_{k}": v for k, v in result.sigs.items()}
    if result.sigs:  # the final stage's signature, as run_pipeline tags it
        sig_tags["sig"] = list(result.sigs.values())[-1]
    return export_run(None, fallback={"grid": grid, "cell": cell, "params": tracking.flat_params(cfg),
                                      "tags": {"git_sha": tracking.git_sha(), **sig_tags, **tags},
                                      "metrics": result.metrics})


def _order(record: Mapping[str, Any]) -> tuple:
    """Which of two records of a cell is the latest: start time, then run id (a stable tie-break)."""
    return int(record.get("start_time") or 0), str(record.get("run_id") or "")


def read_records(paths: Iterable[Path | str]) -> List[Dict[str, Any]]:
    """Records of several export files (a folder means its ``*.jsonl``), latest per (grid, cell).

    Raises:
        ConfigError: a file that does not exist or a line that is not a record (file and line named).
    """
    from experiments.config import ConfigError

    files: List[Path] = []
    for item in paths:
        item = Path(item)
        if item.is_dir():
            files += sorted(item.glob("*.jsonl"))
        elif item.is_file():
            files.append(item)
        else:
            raise ConfigError(f"run records '{item}' do not exist; pass sweeps/records/<grid>.jsonl files "
                              f"or the folder sweeps/records (meddiffaug grid writes them).")
    latest: Dict[tuple, Dict[str, Any]] = {}
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (record["grid"], record["cell"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{file}:{number} is not a run record (JSON with grid and cell); fix or "
                                  f"delete that line, then export the cell again.") from None
            if key not in latest or _order(record) > _order(latest[key]):
                latest[key] = record
    return list(latest.values())


def runs_frame(records: Sequence[Mapping[str, Any]], grid: str) -> Any:
    """A grid's records as the DataFrame ``mlflow.search_runs`` gives (``tags.*``, ``params.*``,
    ``metrics.*``, ``run_id``, ``status``, ``start_time``), so the tables read both alike."""
    import pandas as pd

    rows = []
    for r in records:
        if r.get("grid") != grid:
            continue
        row = {"run_id": r["run_id"], "status": r.get("status", "FINISHED"),
               "start_time": pd.Timestamp(int(r["start_time"]), unit="ms", tz="UTC")}
        row.update({f"metrics.{k}": (float("nan") if v is None else float(v)) for k, v in r["metrics"].items()})
        row.update({f"params.{k}": v for k, v in r["params"].items()})
        row.update({f"tags.{k}": v for k, v in r["tags"].items()})
        rows.append(row)
    return pd.DataFrame(rows)


def finished_records(grid: str, path: Optional[Path] = None) -> List[Dict[str, Any]]:
    """The FINISHED records of ``grid``, oldest first (``[]`` without a file).

    Whether a record still counts as its cell done (same final-stage signature, the final metric
    present) is the grid's question (:mod:`sweeps.finished`); this module only reads the file.
    """
    path = path or records_path(grid)
    if not Path(path).is_file():
        return []
    return [r for r in read_records([path]) if r.get("grid") == grid and r.get("status") == "FINISHED"]


def export_grid(grid: str, tracking_uri: Optional[str] = None, path: Optional[Path] = None) -> int:
    """Export every finished run of a grid already in MLflow (cells run before exports existed).

    Returns:
        How many records the file holds afterwards.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid)
    path = Path(path or records_path(grid))
    if experiment is None:
        return len(read_records([path])) if path.is_file() else 0
    token, found = None, []
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.grid = '{grid}' and attributes.status = 'FINISHED'")
        found += [make_record(grid, run.data.tags["cell"], run.info.run_id, run.info.start_time, run.info.status,
                              run.data.tags, run.data.params, run.data.metrics)
                  for run in page if "cell" in run.data.tags]
        token = page.token
        if not token:
            break
    if found:
        write_records(found, path)
    return len(read_records([path])) if path.is_file() else 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m experiments.reporting.run_records GRID [...] [--tracking-uri URI]``: export grids'
    finished MLflow runs to ``sweeps/records/<grid>.jsonl``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.reporting.run_records", description=main.__doc__)
    parser.add_argument("grids", nargs="+", help="grid names, e.g. diffaug_main")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or the config default")
    args = parser.parse_args(argv)
    from experiments.reporting.store import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    for grid in args.grids:
        print(f"{grid}: {export_grid(grid, uri)} records in {records_path(grid)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
