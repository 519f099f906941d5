"""``meddiffaug sweep STUDY.yaml``: an Optuna study whose trials are pipeline runs logged to MLflow.

Every process (or machine) running the same command shares one RDB storage: ``create_study(...,
load_if_exists=True)`` resumes, a heartbeat marks trials of killed workers stale, and
``RetryHeartbeatStaleTrialCallback`` re-queues them. A trial whose parameters already produced a
FINISHED MLflow run (same ``trial_key``) reuses that run's metric instead of training again, so a
retry never duplicates finished work. Trials share the stage cache: a sweep over ``augment.ratio``
fine-tunes the diffusion model once.

Pruning reaches the segment stage as callbacks the objective passes in
(``pipeline.run_pipeline(..., callbacks=pruning_callbacks())``): the experiments never import the
sweeps. The segment stage calls ``cb.check_pruned()`` after ``trainer.fit`` (only needed under DDP).
"""
from __future__ import annotations

import argparse
import contextvars
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from experiments import tracking
from experiments.runner import pipeline
from experiments.config import ConfigError, load_config
from sweeps import space as sp
from sweeps.runs import parent_run_id, report_best, runs as _runs, client as _client

STUDY_KEYS = {"study_name", "description", "base_config", "overrides", "storage", "direction", "metric",
              "sampler", "pruner", "n_trials", "search_space", "heartbeat_interval", "grace_period",
              "max_retry", "experiment"}
DEFAULT_STORAGE = "sqlite:///outputs/optuna.db"
_TRIAL: contextvars.ContextVar = contextvars.ContextVar("meddiffaug_optuna_trial", default=None)
_MONITOR: contextvars.ContextVar = contextvars.ContextVar("meddiffaug_prune_monitor", default="val/dice")


@dataclass
class StudySpec:
    """A parsed study YAML file."""

    name: str
    base_config: Path
    overrides: List[str]
    space: List[sp.Param]
    storage: str = DEFAULT_STORAGE
    direction: str = "maximize"
    metric: str = "val/dice"
    sampler: Optional[Dict[str, Any]] = None
    pruner: Optional[Dict[str, Any]] = None
    n_trials: Optional[int] = None
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    experiment: Optional[str] = None


def load_study_spec(path: str | Path) -> StudySpec:
    """Parse and validate a study YAML (unknown keys and non-config search keys are errors)."""
    path = Path(path)
    raw = sp.load_yaml(path, "Study")
    sp.check_keys(raw, STUDY_KEYS, str(path))
    for required in ("study_name", "base_config", "search_space"):
        if required not in raw:
            raise ConfigError(f"'{required}' is missing in {path}.")
    sampler, pruner = raw.get("sampler") or {"type": "tpe"}, raw.get("pruner") or {"type": "none"}
    sampler = {"type": sampler} if isinstance(sampler, str) else dict(sampler)
    pruner = {"type": pruner} if isinstance(pruner, str) else dict(pruner)
    if raw.get("direction", "maximize") not in ("maximize", "minimize"):
        raise ConfigError(f"'direction' in {path} must be maximize or minimize.")
    known = {k: raw[k] for k in ("storage", "direction", "metric", "n_trials", "heartbeat_interval",
                                 "grace_period", "max_retry", "experiment") if raw.get(k) is not None}
    return StudySpec(name=str(raw["study_name"]), base_config=sp.resolve_path(raw["base_config"], path.parent),
                     overrides=sp.as_overrides(raw.get("overrides"), str(path)), space=sp.parse_space(raw["search_space"], str(path)),
                     sampler=sampler, pruner=pruner, **known)


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> Any:
    """The sampler of ``spec``; the seed is offset by the trials already in the study so a rerun
    proposes new points instead of replaying the first run's random start-up trials."""
    import optuna

    kwargs = dict(spec.sampler)
    kind = kwargs.pop("type", "tpe")
    seed = kwargs.pop("seed", None)
    seed = None if seed is None else int(seed) + seed_offset
    try:
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **kwargs)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed, **kwargs)
        if kind == "grid":
            return optuna.samplers.GridSampler({p.key: p.grid_values() for p in spec.space}, seed=seed, **kwargs)
    except TypeError as err:
        raise ConfigError(f"sampler of study '{spec.name}': {err}") from err
    raise ConfigError(f"sampler type '{kind}' of study '{spec.name}': choose tpe, random or grid.")


def make_pruner(spec: StudySpec) -> Any:
    """The pruner of ``spec`` (``median`` with its arguments, or ``none``)."""
    import optuna

    kwargs = dict(spec.pruner)
    kind = kwargs.pop("type", "none")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**kwargs)
        if kind == "none" and not kwargs:
            return optuna.pruners.NopPruner()
    except TypeError as err:
        raise ConfigError(f"pruner of study '{spec.name}': {err}") from err
    raise ConfigError(f"pruner '{kind}' {kwargs or ''} of study '{spec.name}': choose median (with its "
                      "arguments) or none.")


def make_storage(url: str, spec: StudySpec) -> Any:
    """RDB storage with heartbeat and automatic retry of trials whose worker died."""
    from sweeps.queue import rdb_storage

    return rdb_storage(url, heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
                       max_retry=spec.max_retry)


def current_trial() -> Any:
    """The ``optuna.Trial`` whose pipeline runs in this thread, or None outside a study."""
    return _TRIAL.get()


def pruning_callbacks(monitor: Optional[str] = None) -> List[Any]:
    """Lightning callbacks that report ``monitor`` to the current trial and prune it.

    The objective passes these to the pipeline, which hands them to the segment stage's Trainer;
    outside a study the list is empty. Under DDP call ``cb.check_pruned()`` after ``trainer.fit``.

    Args:
        monitor: logged metric to report each validation epoch; default: the study's metric
            when it is a ``val/`` metric, else ``val/dice``.
    """
    trial = current_trial()
    if trial is None:
        return []
    from optuna_integration import PyTorchLightningPruningCallback

    return [PyTorchLightningPruningCallback(trial, monitor=monitor or _MONITOR.get())]


class Objective:
    """Callable for ``study.optimize``: one pipeline run per trial, deduplicated by ``trial_key``."""

    def __init__(self, spec: StudySpec, experiment_id: Optional[str], parent_id: Optional[str], n_jobs: int = 1):
        self.spec, self.experiment_id, self.parent_id, self.n_jobs = spec, experiment_id, parent_id, n_jobs
        self._local = threading.local()  # one datamodule per thread (stages only read it)
        self._locks: Dict[Any, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def __call__(self, trial: Any) -> float:
        import optuna

        spec = self.spec
        params = {p.key: p.suggest(trial) for p in spec.space}
        cfg = load_config(spec.base_config, spec.overrides + sp.to_overrides(params))
        sigs = pipeline.signatures(cfg)
        key = sp.short_hash({"study": spec.name, "params": params, "sig": sigs[pipeline.required_stages(cfg)[-1]]})
        trial.set_user_attr("trial_key", key)
        if self.experiment_id is not None:
            self._close_stale_runs(trial)
            done = _runs(self.experiment_id, f"tags.trial_key = '{key}' and attributes.status = 'FINISHED'", 1)
            if done and spec.metric in done[0].data.metrics:
                print(f"[sweep] trial {trial.number}: reusing finished MLflow run {done[0].info.run_id}", flush=True)
                trial.set_user_attr("mlflow_run_id", done[0].info.run_id)
                trial.set_user_attr("reused", True)
                return float(done[0].data.metrics[spec.metric])
        datamodule = self._datamodule(cfg)
        if self.n_jobs > 1:
            self._warm_upstream(cfg, datamodule, sigs)
        tags = {"study": spec.name, "trial": str(trial.number), "trial_key": key, "role": "trial"}
        if self.parent_id:  # explicit, so trials in worker threads (no active parent there) nest too
            tags["mlflow.parentRunId"] = self.parent_id
        token = _TRIAL.set(trial)
        monitor = _MONITOR.set(spec.metric if spec.metric.startswith("val/") else "val/dice")
        try:
            result = pipeline.run_pipeline(cfg, nested=True, run_name=f"trial-{trial.number}", tags=tags,
                                           datamodule=datamodule, callbacks=pruning_callbacks())
        except optuna.TrialPruned:
            self._mark(trial, "KILLED", {"pruned": "true"})
            raise
        finally:
            _TRIAL.reset(token)
            _MONITOR.reset(monitor)
        if spec.metric not in result.metrics:
            raise ConfigError(f"metric '{spec.metric}' not produced; available: {sorted(result.metrics)}")
        trial.set_user_attr("mlflow_run_id", result.run_id)
        return float(result.metrics[spec.metric])

    def _datamodule(self, cfg: Any) -> Any:
        """Build the datamodule once per distinct ``cfg.data`` (per thread)."""
        from omegaconf import OmegaConf

        key = sp.short_hash(OmegaConf.to_container(cfg.data, resolve=True))
        if getattr(self._local, "key", None) != key:
            self._local.key, self._local.dm = key, pipeline.build_datamodule(cfg)
        return self._local.dm

    def _warm_upstream(self, cfg: Any, datamodule: Any, sigs: Dict[str, str]) -> None:
        """With threads, compute shared upstream stages under a lock so two trials never write the
        same ``<sig>.partial`` folder at once; the trial's own run then finds them cached."""
        needed = pipeline.required_stages(cfg)
        if len(needed) < 2:
            return
        key = tuple(sigs[s] for s in needed[:-1])
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            pipeline.run_stages(cfg, targets=[needed[-2]], run=None, datamodule=datamodule)

    def _mark(self, trial: Any, status: str, tags: Dict[str, str]) -> None:
        """Give this trial's unfinished MLflow run(s) ``status`` (a pruned run ends as FAILED)."""
        if self.experiment_id is None:
            return
        for run in _runs(self.experiment_id, f"tags.study = '{self.spec.name}' and tags.trial = '{trial.number}'"):
            if run.info.status == "FINISHED":
                continue
            for name, value in tags.items():
                _client().set_tag(run.info.run_id, name, value)
            _client().set_terminated(run.info.run_id, status)

    def _close_stale_runs(self, trial: Any) -> None:
        """A retried trial's predecessors died mid-run: mark their RUNNING MLflow runs KILLED."""
        history = trial.storage.get_trial_system_attrs(trial._trial_id).get("retry_history", [])
        for number in history:
            for run in _runs(self.experiment_id, f"tags.study = '{self.spec.name}' and tags.trial = '{number}' "
                                                 "and attributes.status = 'RUNNING'"):
                _client().set_terminated(run.info.run_id, "KILLED")


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug sweep STUDY.yaml [--n-trials N] [--n-jobs J] [--storage URL] [--timeout S]``."""
    parser = argparse.ArgumentParser(prog="meddiffaug sweep", description=main.__doc__)
    parser.add_argument("study", help="study YAML, e.g. sweeps/studies/procedural_polyp_tpe.yaml")
    parser.add_argument("--n-trials", type=int, default=None, help="trials this process runs (default: YAML)")
    parser.add_argument("--n-jobs", type=int, default=1, help="parallel trials in this process (threads)")
    parser.add_argument("--storage", default=None, help=f"Optuna RDB URL (default: YAML or {DEFAULT_STORAGE})")
    parser.add_argument("--timeout", type=float, default=None, help="stop starting trials after S seconds")
    parser.add_argument("--max-total-trials", type=int, default=None,
                        help="stop once the study (all workers) has this many complete/pruned trials")
    parser.add_argument("--no-plots", action="store_true", help="skip the importance/history plots")
    args = parser.parse_args(argv)
    import mlflow
    import optuna

    spec = load_study_spec(args.study)
    storage_url = args.storage or spec.storage
    base = load_config(spec.base_config, spec.overrides, overrides_source=f"study file '{args.study}'")
    for param in spec.space:  # resolve the space's corners now: a type error fails before trial 0
        corner = param.choices if param.type == "categorical" else (param.low, param.high)
        for value in corner:
            value = int(value) if param.type == "int" else value
            load_config(spec.base_config, spec.overrides + sp.to_overrides({param.key: value}),
                        overrides_source=f"the search space of study file '{args.study}'")
    from experiments.runner.preflight import check_base, check_outputs

    check_outputs(base)  # faults every trial would hit stop the study before trial 0
    check_base(base)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=make_storage(storage_url, spec),
                                direction=spec.direction, pruner=make_pruner(spec), load_if_exists=True)
    # A seeded sampler replays its random start-up points: offset the seed by the trials already run,
    # and on a database server (workers on several machines start together) by the process too.
    shared = not storage_url.startswith("sqlite")
    study.sampler = make_sampler(spec, seed_offset=len(study.trials) + (os.getpid() if shared else 0))
    n_trials = args.n_trials if args.n_trials is not None else spec.n_trials
    callbacks = []
    if args.max_total_trials is not None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        callbacks.append(optuna.study.MaxTrialsCallback(args.max_total_trials, states=states))
        if len(study.get_trials(deepcopy=False, states=states)) >= args.max_total_trials:
            n_trials = 0
    # The grid sampler stops the study itself once every grid point ran.
    if n_trials is None and args.timeout is None and args.max_total_trials is None and \
            spec.sampler.get("type") != "grid":
        raise ConfigError("Give n_trials in the study YAML, --n-trials, --timeout or --max-total-trials.")
    out_dir = Path(base.output_dir) / "studies" / spec.name
    experiment = spec.experiment or spec.name
    if not (base.tracking.enabled and tracking.is_rank_zero()):
        study.optimize(Objective(spec, None, None, args.n_jobs), n_trials=n_trials, timeout=args.timeout,
                       n_jobs=args.n_jobs, gc_after_trial=True, callbacks=callbacks)
        report_best(study, spec, out_dir, plots=False)
        return 0
    experiment_id = tracking.set_experiment(base, experiment)
    parent = parent_run_id(experiment_id, spec.name)
    with mlflow.start_run(run_id=parent):
        mlflow.set_tags({"sampler": spec.sampler.get("type"), "metric": spec.metric, "direction": spec.direction,
                         "storage": storage_url.split("@")[-1]})  # never log a password in a DB URL
        mlflow.log_text(Path(args.study).read_text(), "study.yaml")
        study.optimize(Objective(spec, experiment_id, parent, args.n_jobs), n_trials=n_trials,
                       timeout=args.timeout, n_jobs=args.n_jobs, gc_after_trial=True, callbacks=callbacks)
        report_best(study, spec, out_dir, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
