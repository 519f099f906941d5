"""``meddiffaug ui``: the MLflow UI on 127.0.0.1, opened at the runs table of an experiment.

MLflow is started through the running interpreter (``python -m mlflow``), so the command works from
a fresh shell where the venv's ``bin/`` is not on ``PATH``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional

DEFAULT_STORE = "sqlite:///outputs/mlflow.db"


def runs_table_url(host: str, port: int, experiment_id: Optional[str] = None) -> str:
    """The UI address of an experiment's runs table (the UI's home page without an experiment)."""
    base = f"http://{host}:{port}"
    return f"{base}/#/experiments/{experiment_id}/runs" if experiment_id else base


def experiment_id_of(store_uri: str, name: str) -> Optional[str]:
    """The id of experiment ``name`` in ``store_uri``, or None when the store or experiment is absent."""
    if store_uri.startswith("sqlite:///") and not os.path.exists(store_uri[len("sqlite:///"):]):
        return None  # don't create an empty database just to look
    from mlflow.tracking import MlflowClient

    try:
        experiment = MlflowClient(tracking_uri=store_uri).get_experiment_by_name(name)
    except Exception:  # an unreachable server: the UI start reports the real problem
        return None
    return experiment.experiment_id if experiment is not None else None


def mlflow_ui_command(store_uri: str, host: str, port: int) -> List[str]:
    """The command line that serves the UI for ``store_uri`` with one worker."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def ui_main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug ui``: start the MLflow UI on 127.0.0.1 with one worker."""
    parser = argparse.ArgumentParser(prog="meddiffaug ui", description=ui_main.__doc__)
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backend-store-uri", default=None,
                        help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_STORE}")
    parser.add_argument("--experiment", default="demo",
                        help="experiment whose runs table the printed URL opens (default: demo)")
    args = parser.parse_args(argv)
    store = args.backend_store_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    command = mlflow_ui_command(store, args.host, args.port)
    print("Starting:", " ".join(command), flush=True)
    experiment_id = experiment_id_of(store, args.experiment)
    print(f"Runs of '{args.experiment}':", runs_table_url(args.host, args.port, experiment_id), flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
