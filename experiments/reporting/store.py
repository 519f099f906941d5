"""The MLflow store the tables read when no ``--tracking-uri`` is given: the pipeline's own choice."""
from __future__ import annotations


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` or the config default, exactly as the pipeline resolves it."""
    from experiments.config import load_config
    from experiments.tracking import tracking_uri

    return tracking_uri(load_config())
