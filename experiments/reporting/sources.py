"""Where a table's runs come from: the FINISHED runs of its grids in MLflow, or the run records the
grid runner exports into the repository (:mod:`experiments.reporting.run_records`); both give the
same rows in the same order, so the same tables to the last byte."""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional, Sequence

import pandas as pd

from experiments.reporting.keys import canon, column_of, with_external
from experiments.reporting.run_records import runs_frame
from experiments.reporting.store import default_tracking_uri

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


def memo_collect_runs(tracking_uri: Optional[str], records: Optional[Sequence[Dict[str, Any]]]) -> Callable:
    """:func:`collect_runs` on one store, each ``(grid, filter)`` read once: a table command asks for a
    grid's runs for its completeness count and again for each table that reads it (one MLflow search each
    otherwise). ``fetch(grid, filter)`` returns a copy, so a caller's changes stay its own."""
    seen: Dict[str, pd.DataFrame] = {}

    def fetch(grid: str, filter: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
        key = json.dumps([grid, filter], sort_keys=True, default=str)
        if key not in seen:
            seen[key] = collect_runs(grid, tracking_uri, filter, records)
        return seen[key].copy()

    return fetch


def gather_runs(spec: Dict[str, Any], fetch: Callable) -> pd.DataFrame:
    """The runs of every grid a table reads, through ``fetch`` (:func:`memo_collect_runs`); with ``grids:``
    each run gets the tag ``grid_key`` (e.g. ``modality``) set to its grid's label, so rows can group by
    it; with ``external:`` (one set, or one per grid label) the set's metrics are also read as
    ``test/external/<metric>``."""
    frames = []
    for label, grid in spec["sources"]:
        df = fetch(grid, spec.get("filter"))
        if label is not None and len(df):
            df = df.assign(**{f"tags.{spec.get('grid_key', 'group')}": label})
        external = spec.get("external")
        external = external.get(label) if isinstance(external, dict) else external
        if external and len(df):
            df = with_external(df, str(external))
        frames.append(df)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0] if frames else pd.DataFrame()
