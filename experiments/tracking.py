"""MLflow tracking: one store for every run, resolved config and pictures logged with each.

The default store is ``sqlite:///outputs/mlflow.db`` with artifacts under ``outputs/mlruns``;
``MLFLOW_TRACKING_URI`` wins when set, so a team can point every worker at one ``mlflow server``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError, to_yaml

# The tag MLflow 3's UI reads to choose an experiment's landing page (runs table vs GenAI traces).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

# MLflow's sqlite store prints its schema migrations on first use; they are noise to a user.
logging.getLogger("alembic").setLevel(logging.WARNING)
# Its system-metrics sampler announces its start and stop at INFO for every run: three lines per cell
# that tell a user nothing (its failures are warnings, and still print).
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
# One system-metrics sample every 30 s (MLflow's default is 10 s): each costs a store read and a write,
# about 65 ms on a SQLite store, so 0.2 % of one core (docs/operating-grids.md), and a cell of a few
# minutes still gets several samples. Set the variable to choose another interval.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def tracking_uri(cfg: DictConfig) -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking.uri``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def uri_source() -> str:
    """The key the tracking URI comes from, for messages: ``MLFLOW_TRACKING_URI`` or ``tracking.uri``."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"


def require_server(uri: str, key: str = "MLFLOW_TRACKING_URI", timeout_s: float = 10.0) -> None:
    """Raise :class:`ConfigError` unless an MLflow tracking server answers at an ``http(s)://`` ``uri``
    (any HTTP answer counts; other URIs are local stores and pass).

    Without this, MLflow retries a refused connection for minutes and ends in a traceback.
    """
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # it answered (an auth wall, a proxy's path prefix): someone is there
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ConfigError(f"the MLflow tracking server {uri} ({key}) does not answer: {reason}. Start it "
                          f"(`mlflow server --host 0.0.0.0 --port 5000 ...`, see docs/scaling-out.md), "
                          f"correct {key}, or unset MLFLOW_TRACKING_URI to use the local store") from err


def git_sha() -> str:
    """The commit of the code that produced a run ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_rank_zero() -> bool:
    """True outside launched distributed jobs and on global rank 0 inside them (torchrun, SLURM)."""
    from experiments.runner.distributed import global_rank

    return global_rank() == 0


def set_experiment(cfg: DictConfig, name: Optional[str] = None) -> str:
    """Select (creating if needed) the MLflow experiment and return its id."""
    import mlflow

    uri = tracking_uri(cfg)
    require_server(uri, uri_source())
    mlflow.set_tracking_uri(uri)
    name = name or cfg.tracking.experiment or cfg.name
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        mlflow.set_experiment(name)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            mark_model_training(experiment.experiment_id)
        return experiment.experiment_id
    try:
        experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location(cfg, name))
    except Exception:  # another worker created it between our check and create
        experiment_id = mlflow.get_experiment_by_name(name).experiment_id
    mlflow.set_experiment(name)
    mark_model_training(experiment_id)
    return experiment_id


def artifact_location(cfg: DictConfig, name: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts.

    A tracking server (``http(s)://``) owns them: None lets it choose its artifact root, so runs
    upload through its proxied artifact store and every teammate sees the pictures. A local store
    (SQLite, a database URL, a folder) writes to ``<tracking.artifact_root>/<name>`` on this
    machine; the default root follows ``output_dir`` (``<output_dir>/mlruns``).
    """
    if tracking_uri(cfg).split(":", 1)[0].lower() in ("http", "https", "databricks"):
        return None
    root = cfg.tracking.artifact_root
    if root == "outputs/mlruns":  # the schema default: under output_dir, like the rest of the outputs
        root = str(Path(cfg.output_dir) / "mlruns")
    return f"{Path(root).resolve().as_uri()}/{name}"


def mark_model_training(experiment_id: str) -> None:
    """Tag an experiment as model training, so MLflow's UI opens on its runs table (not GenAI traces)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def log_data_inputs(cfg: DictConfig, datamodule: Any, external: Sequence[Any] = ()) -> None:
    """Log each split of the run's data as an MLflow dataset input (the runs table's Dataset column).

    The name is the dataset, the context the split, and the digest a hash of the split's image ids,
    so runs on the same split share a digest and can be filtered by it. Each external test set
    (:class:`datamodules.external.ExternalSet`) is one more input, named by its label, context ``external``.
    """
    import mlflow
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    if mlflow.active_run() is None:
        return
    from mlflow.exceptions import MlflowException

    source = HTTPDatasetSource(url=_data_source_uri(cfg))
    # "normal": the lesion-free source pool outside the label budget (data.n_normal), when there is one.
    splits = tuple(s for s in ("train_few", "val", "test", "normal") if datamodule.split_indices.get(s))
    datasets = []
    for split in splits:
        ids = [datamodule.ids[i] for i in datamodule.split_indices.get(split, [])]
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
        datasets.append(MetaDataset(source, name=f"{cfg.data.name}/{split}", digest=digest))
    for ext in external:
        datasets.append(MetaDataset(HTTPDatasetSource(url=ext.source), name=ext.label, digest=ext.digest))
    splits += ("external",) * len(external)
    for attempt in range(4):
        try:
            mlflow.log_inputs(datasets=datasets, contexts=list(splits), tags_list=[{} for _ in splits])
            return
        except MlflowException as err:
            # Workers logging the same new dataset at once race on the store's unique (name,
            # digest) row; the loser finds the row on its next try. Any other error is a bug.
            if "unique" not in str(err).lower() and "integrity" not in str(err).lower():
                raise
            if attempt == 3:
                logging.getLogger(__name__).warning("dataset inputs not logged: %s", err)
            time.sleep(0.2 * (attempt + 1))


def _data_source_uri(cfg: DictConfig) -> str:
    if cfg.data.root:
        return Path(cfg.data.root).resolve().as_uri()
    return f"procedural://{cfg.data.name}?seed={cfg.data.get('procedural_seed')}"


def flat_params(cfg: DictConfig) -> Dict[str, str]:
    """Dotted key -> string value of every leaf, for ``mlflow.log_params``."""
    flat: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)[:500]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


@contextlib.contextmanager
def start_run(cfg: DictConfig, run_name: str, tags: Optional[Dict[str, str]] = None,
              nested: bool = False, experiment: Optional[str] = None) -> Iterator[Any]:
    """Open an MLflow run that carries the resolved config, its params and the code version.

    Yields the active ``mlflow.ActiveRun`` (or ``None`` when tracking is disabled or not rank 0). While
    open the run samples system metrics (``system/*``: CPU, memory, disk, network, and GPU where NVML is
    installed) every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (30 unless set).
    """
    if not cfg.tracking.enabled or not is_rank_zero():
        yield None
        return
    import mlflow

    if not nested:
        set_experiment(cfg, experiment)
    all_tags = {"git_sha": git_sha(), "config_name": cfg.name, **(tags or {})}
    with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags, log_system_metrics=True) as run:
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        mlflow.log_params(flat_params(cfg))
        yield run


def log_metrics(metrics: Dict[str, float], step: Optional[int] = None) -> None:
    """Log finite float metrics to the active run (no-op without one)."""
    import math

    import mlflow

    if mlflow.active_run() is None:
        return
    clean = {k: float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_stage_folder(stage_dir: Path, artifact_path: str) -> None:
    """Log the pictures and small manifests of a finished stage folder to the active run."""
    import mlflow

    if mlflow.active_run() is None:
        return
    for path in sorted(stage_dir.glob("*")):
        if path.suffix in {".png", ".jsonl", ".json"} and path.stat().st_size < 20_000_000:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def lightning_logger(run: Any, cfg: DictConfig) -> Any:
    """A Lightning ``MLFlowLogger`` writing training curves into ``run`` (None without a run).

    The pipeline owns the run's status: Lightning's logger ends its run when ``fit`` ends, which
    would mark the pipeline's run FINISHED after the fine-tune, before the later stages ran (a kill
    then left a "finished" run without test metrics). This logger leaves the run open.
    """
    if run is None:
        return None
    from experiments.runner.stage_logger import StageLogger

    return StageLogger(tracking_uri=tracking_uri(cfg), run_id=run.info.run_id,
                       experiment_name=_experiment_name(run))


def _experiment_name(run: Any) -> str:
    import mlflow

    return mlflow.get_experiment(run.info.experiment_id).name
