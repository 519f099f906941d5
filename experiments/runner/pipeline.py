"""The experiment pipeline: finetune → generate → validate → segment, with a stage cache.

Every stage writes ``artifacts/<stage>/<sig>/`` where ``sig`` hashes the config subtree the stage
depends on plus its upstream signatures. A finished stage (``DONE`` marker holding its metrics) is
reused, never redone, so a sweep over ``validator.iou_threshold`` only re-filters and a sweep over
``augment.ratio`` only retrains the segmenter. Work in progress lives in ``<sig>.partial/`` (a
stable name, so checkpoints there let a killed run resume) and is renamed into place on success.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.io import atomic_write_text, short_hash
from experiments import tracking
from experiments.config import STAGES, ConfigError
from experiments.cache.signatures import subtree
from experiments.runner.external_tests import external_sets
from experiments.stages import finetune, generate, segment, validate

# Each stage module declares ``VERSION``, ``inputs(cfg)`` and its ``run_<stage>`` entry next to its code.
STAGE_MODULES = {"finetune": finetune, "generate": generate, "validate": validate, "segment": segment}
# Entry points, ``(cfg, datamodule, workdir, upstream, logger=None) -> metrics``; tests swap in fakes here.
STAGE_FUNCTIONS: Dict[str, Callable[..., Dict[str, float]]] = {
    name: getattr(module, f"run_{name}") for name, module in STAGE_MODULES.items()}
# Under a launcher, training a stage that otherwise runs on rank 0 alone needs first, joined by every
# rank: ``(needed(cfg, datamodule, workdir, upstream) -> bool, train(cfg, datamodule, workdir, upstream))``.
JOINT_TRAINING: Dict[str, tuple] = {"validate": (validate.gate_training_needed, validate.train_gate_model)}


def required_stages(cfg: DictConfig) -> List[str]:
    """The stages an experiment needs, in order, given its augmentation method."""
    method = cfg.augment.method
    if method == "diffusion":
        return list(STAGES)
    if method == "copy_paste":
        return ["generate", "validate", "segment"]
    return ["segment"]


def upstream_of(cfg: DictConfig, stage: str) -> List[str]:
    """Stages whose outputs ``stage`` reads."""
    needed = required_stages(cfg)
    return [s for s in needed[: needed.index(stage)]] if stage in needed else []


def stage_inputs(cfg: DictConfig, stage: str) -> Dict[str, Any]:
    """The config values a stage's result depends on (its own part of the signature), from its module."""
    if stage not in STAGE_MODULES:
        raise ConfigError(f"Unknown stage '{stage}'; choose from {', '.join(STAGES)}.")
    return STAGE_MODULES[stage].inputs(cfg)


def stage_version(stage: str) -> int:
    """A stage's code version (its module's ``VERSION``). Version 0 adds nothing to the hash, so results
    cached before versions existed stay valid; a bump recomputes the stage and everything downstream."""
    return int(STAGE_MODULES[stage].VERSION)


def signature(cfg: DictConfig, stage: str, upstream_sigs: Dict[str, str]) -> str:
    """A short stable hash of a stage's inputs, its code version and its upstream signatures."""
    payload = {"stage": stage, "inputs": stage_inputs(cfg, stage), "upstream": upstream_sigs}
    if stage_version(stage):
        payload["version"] = stage_version(stage)
    return short_hash(payload)


def signatures(cfg: DictConfig) -> Dict[str, str]:
    """Signature of every stage the experiment needs."""
    sigs: Dict[str, str] = {}
    for stage in required_stages(cfg):
        sigs[stage] = signature(cfg, stage, {s: sigs[s] for s in upstream_of(cfg, stage)})
    return sigs


def read_done(stage_dir: Path) -> Optional[Dict[str, float]]:
    """Metrics of a finished stage folder, or None if it is not finished."""
    marker = stage_dir / "DONE"
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _finish(partial: Path, final: Path, metrics: Dict[str, float]) -> None:
    """Write the DONE marker and move the stage folder into place atomically."""
    atomic_write_text(partial / "DONE", json.dumps(metrics, indent=2, sort_keys=True))
    for checkpoint in partial.rglob("*.ckpt"):  # resume state only; results live in DONE and named files
        checkpoint.unlink()
    if final.exists():  # a forced recompute replaces the old result
        shutil.rmtree(final)
    os.replace(partial, final)


@dataclass
class PipelineResult:
    """What one pipeline run produced."""

    metrics: Dict[str, float] = field(default_factory=dict)
    sigs: Dict[str, str] = field(default_factory=dict)
    stage_dirs: Dict[str, Path] = field(default_factory=dict)
    cached: Dict[str, bool] = field(default_factory=dict)
    run_id: Optional[str] = None


def run_stages(cfg: DictConfig, targets: Optional[Iterable[str]] = None, force: Iterable[str] = (),
               run: Any = None, datamodule: Any = None, callbacks: Iterable[Any] = (),
               on_stage: Optional[Callable[[str], None]] = None) -> PipelineResult:
    """Run (or reuse) the target stages and everything upstream of them.

    Args:
        cfg: resolved config.
        targets: stages to produce; default ``cfg.stages``. Upstream stages are computed too
            (or reused from the cache).
        force: stages to recompute even when cached.
        run: the active MLflow run (stage outputs are logged to it), or None.
        datamodule: an already set-up datamodule to reuse (sweeps build it once; stages only read it).
        callbacks: Lightning callbacks for the segment stage's training (e.g. Optuna pruning).
        on_stage: called with each stage's name as it starts (grid workers record it in their queue).

    Returns:
        A :class:`PipelineResult` with every stage's metrics and signatures.
    """
    needed = required_stages(cfg)
    explicit = targets is not None
    targets = list(targets or cfg.stages)
    unknown = [s for s in list(targets) + list(force) if s not in STAGES]
    if unknown:
        raise ConfigError(f"Unknown stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    skipped = [s for s in targets if s not in needed]
    if skipped and explicit:  # a config's default stage list may name stages a method does not use
        print(f"[meddiffaug] stage(s) {skipped} not used by augment.method={cfg.augment.method}; skipped.")
    last = max((needed.index(s) for s in targets if s in needed), default=-1)
    todo = needed[: last + 1]

    if datamodule is None:
        datamodule = build_datamodule(cfg)
    external = external_sets(cfg, datamodule)  # loaded and checked against the run's data before any stage
    if run is not None:
        tracking.log_data_inputs(cfg, datamodule, external)
    root = Path(cfg.artifacts_dir)
    result = PipelineResult()
    from experiments.runner.distributed import coordinator as launched

    coordinator = launched(cfg.trainer.accelerator)
    for stage in todo:
        if on_stage is not None:
            on_stage(stage)
        ups = upstream_of(cfg, stage)
        sig = signature(cfg, stage, {s: result.sigs[s] for s in ups})
        final, partial = root / stage / sig, root / stage / f"{sig}.partial"
        def read(stage=stage, final=final):
            return None if stage in force else read_done(final)

        def compute(finish, stage=stage, partial=partial, final=final, ups=ups):
            return _compute(cfg, stage, datamodule, partial, final, {s: result.stage_dirs[s] for s in ups},
                            run, callbacks, finish=finish)

        lock = root / stage / f"{sig}.lock"
        if coordinator is not None:  # under torchrun/srun: rank 0 decides, every rank trains
            joint = None
            if stage in JOINT_TRAINING:
                needed, train = JOINT_TRAINING[stage]
                dirs = {s: result.stage_dirs[s] for s in ups}
                joint = (lambda needed=needed, p=partial, d=dirs: needed(cfg, datamodule, p, d),
                         lambda train=train, p=partial, d=dirs: train(cfg, datamodule, p, d))
            metrics, result.cached[stage] = coordinator.run_stage(
                stage, lock, read, compute, lambda m, p=partial, f=final: _finish(p, f, m), joint_training=joint)
        else:
            with _stage_lock(lock):  # workers sharing artifacts/ compute a stage once
                metrics = read()
                result.cached[stage] = metrics is not None
                if metrics is None:
                    metrics = compute(True)
        if result.cached[stage]:
            print(f"[meddiffaug] stage {stage} ({sig}) cached at {final}", flush=True)
        result.sigs[stage], result.stage_dirs[stage] = sig, final
        result.metrics.update(metrics)
        if run is not None:
            tracking.log_metrics(metrics)
            tracking.log_stage_folder(final, stage)
    return result


def _compute(cfg: DictConfig, stage: str, datamodule: Any, partial: Path, final: Path,
             upstream: Dict[str, Path], run: Any, callbacks: Iterable[Any] = (), finish: bool = True) -> Dict[str, float]:
    partial.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"[meddiffaug] stage {stage} ({final.name}) running in {partial}", flush=True)
    logger = tracking.lightning_logger(run, cfg) if stage in ("finetune", "segment") else None
    extra = {"callbacks": list(callbacks)} if stage == "segment" and callbacks else {}
    metrics = STAGE_FUNCTIONS[stage](cfg, datamodule, partial, upstream, logger=logger, **extra)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics[f"time/{stage}_s"] = round(time.time() - start, 2)
    print(f"[meddiffaug] stage {stage} ({final.name}) done in {metrics[f'time/{stage}_s']:.1f} s", flush=True)
    if finish:
        _finish(partial, final, metrics)
    return metrics


def _stage_lock(path: Path) -> Any:
    """An exclusive lock across processes and machines (see :mod:`experiments.cache.locks`)."""
    from experiments.cache.locks import stage_lock

    return stage_lock(path)


def build_datamodule(cfg: DictConfig) -> Any:
    """Create and set up the datamodule of ``cfg.data``; write its split file next to the run."""
    from datamodules import create_datamodule

    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    name = kwargs.pop("name")
    datamodule = create_datamodule(name, **kwargs)
    datamodule.setup()
    split_dir = Path(cfg.output_dir) / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    # The readable part names the usual axes; the hash tells apart every other data setting
    # (procedural content seed, label budget, test pool), so runs never overwrite each other's split.
    datamodule.write_split(split_dir / f"{name}_seed{cfg.data.split_seed}_n{cfg.data.n_real}"
                                       f"_{short_hash(subtree(cfg, 'data'), 8)}.json")
    return datamodule


def run_pipeline(cfg: DictConfig, targets: Optional[Iterable[str]] = None, force: Iterable[str] = (),
                 run_name: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
                 nested: bool = False, experiment: Optional[str] = None,
                 datamodule: Any = None, callbacks: Iterable[Any] = (),
                 on_stage: Optional[Callable[[str], None]] = None) -> PipelineResult:
    """Run the pipeline inside one MLflow run tagged with every stage signature (``on_stage``: see
    :func:`run_stages`)."""
    sigs = signatures(cfg)
    run_tags = {"stage": ",".join(targets or cfg.stages), "method": cfg.augment.method,
                **{f"sig_{k}": v for k, v in sigs.items()}, **(tags or {})}
    run_tags["sig"] = sigs[required_stages(cfg)[-1]]
    with tracking.start_run(cfg, run_name or cfg.name, tags=run_tags, nested=nested,
                            experiment=experiment) as run:
        result = run_stages(cfg, targets, force, run=run, datamodule=datamodule, callbacks=callbacks,
                            on_stage=on_stage)
        result.run_id = run.info.run_id if run is not None else None
    return result
