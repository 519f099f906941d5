"""MLflow look-ups shared by studies and grids, and the end-of-study report (best trial, plots)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from experiments import tracking


def client() -> Any:
    """An MlflowClient on the current tracking URI."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def runs(experiment_id: str, filters: str, max_results: int = 1000) -> List[Any]:
    """Runs of one experiment matching an MLflow filter string, oldest first."""
    return client().search_runs([experiment_id], filter_string=filters, max_results=max_results,
                                  order_by=["attributes.start_time ASC"])


def parent_run_id(experiment_id: str, study: str) -> str:
    """The study's parent MLflow run: found by tags on rerun, created once otherwise.

    Two workers starting together may both create one; the older wins and the other is deleted.
    """
    filters = f"tags.study = '{study}' and tags.role = 'study_parent'"
    found = runs(experiment_id, filters)
    if found:
        return found[0].info.run_id
    mine = client().create_run(experiment_id, run_name=f"study-{study}",
                                tags={"study": study, "role": "study_parent", "git_sha": tracking.git_sha()})
    winner = runs(experiment_id, filters)[0].info.run_id
    if winner != mine.info.run_id:
        client().delete_run(mine.info.run_id)
    return winner


def report_best(study: Any, spec: Any, out_dir: Path, plots: bool = True) -> Optional[Dict[str, Any]]:
    """Print the best trial as one JSON line; log it, ``best/<metric>`` and plots to the active run."""
    import mlflow
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    if not done:
        print(json.dumps({"study": spec.name, "best": None, "trials": counts}))
        return None
    best = study.best_trial
    summary = {"study": spec.name, "metric": spec.metric, "best_value": best.value, "best_trial": best.number,
               "best_params": best.params, "trials": counts}
    print(json.dumps(summary, default=str), flush=True)
    if mlflow.active_run() is None:
        return summary
    mlflow.log_metric(f"best/{spec.metric}", best.value)
    # Params are immutable in MLflow and the best changes between reruns: tags, not params.
    mlflow.set_tags({"best.trial": best.number, **{f"best.{k}": v for k, v in best.params.items()}})
    mlflow.log_dict(summary, "best_trial.json")
    if plots:
        for path in _plots(study, out_dir):
            mlflow.log_artifact(str(path), artifact_path="plots")
    return summary


def _plots(study: Any, out_dir: Path) -> List[Path]:
    """Optimisation history and parameter importances as PNGs; skipped with a note when Optuna cannot
    draw them (fewer than 2 finished trials, or no parameter varies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study)
            path = out_dir / f"{name}.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            written.append(path)
        except Exception as err:  # noqa: BLE001 - a missing plot must not fail a finished study
            print(f"[sweep] {name} plot skipped: {type(err).__name__}: {err}", flush=True)
    return written


