"""Which cells of a grid are done: a finished MLflow run of the cell's current signature, or its
committed run record (``sweeps/records/``); and where the grid's queue lives by default."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from experiments import tracking


def default_storage(cfg: Any) -> str:
    """The queue's default storage: ``optuna.db`` beside a SQLite MLflow store, else under ``output_dir``."""
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path(cfg.output_dir) / 'optuna.db'}"


def mlflow_experiment(cells: Sequence[Any]) -> Optional[str]:
    import mlflow

    uri = tracking.tracking_uri(cells[0].config())
    tracking.require_server(uri, tracking.uri_source())  # fail in seconds, not after MLflow's retries
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cells[0].grid)
    return None if experiment is None else experiment.experiment_id


def done_in_records(grid: str, wanted: Dict[str, Sequence[str]], path: Optional[Path] = None) -> Dict[str, str]:
    """Cells of ``grid`` done according to its run records: cell signature -> run id.

    Args:
        grid: grid name.
        wanted: cell signature -> ``(final stage, its signature, the metric that proves it done)``, as
            :meth:`sweeps.grid.Cell.identity` gives; a record counts only for the cell's current
            final-stage signature and with that metric, exactly as an MLflow run does.
        path: the records file; default ``sweeps/records/<grid>.jsonl``.
    """
    from experiments.reporting.run_records import finished_records

    return {r["cell"]: r["run_id"] for r in finished_records(grid, path)
            if r["cell"] in wanted and r["tags"].get("sig") == wanted[r["cell"]][1]
            and r["metrics"].get(wanted[r["cell"]][2]) is not None}


def finished_cells(cells: Sequence[Any]) -> Dict[str, str]:
    """Cell signature -> run id of its done MLflow run, for cells already done.

    Done means FINISHED, logged for the cell's current final-stage signature (a base-YAML edit or a
    stage-version bump makes a cell not done) and holding the final stage's metric: a run's status
    alone is a claim (a killed run's logger may have ended it), the final metric is the fact.
    """
    from mlflow.tracking import MlflowClient

    if not cells:
        return {}
    wanted = {c.sig: c.identity() for c in cells}
    # Cells in the committed run records are done on any machine (the MLflow store is not committed).
    done: Dict[str, str] = done_in_records(cells[0].grid, wanted)
    experiment_id = mlflow_experiment(cells)
    if experiment_id is None:
        return done
    token = None
    while True:  # paginate: a grid can hold more cells than one page
        page = MlflowClient().search_runs([experiment_id], max_results=1000, page_token=token,
                                          filter_string=f"tags.grid = '{cells[0].grid}' and attributes.status = 'FINISHED'")
        for run in page:
            cell = run.data.tags.get("cell")
            if cell in wanted and run.data.tags.get("sig") == wanted[cell][1] and wanted[cell][2] in run.data.metrics:
                done[cell] = run.info.run_id
        token = page.token
        if not token:
            return done
