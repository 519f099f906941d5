"""The experiment pipeline: finetune → generate → validate → segment, with a stage cache.

Every stage writes ``artifacts/<stage>/<sig>/`` where ``sig`` hashes the config subtree the stage
depends on plus its upstream signatures. A finished stage (``DONE`` marker holding its metrics) is
reused, never redone, so a sweep over ``validator.iou_threshold`` only re-filters and a sweep over
``augment.ratio`` only retrains the segmenter. Work in progress lives in ``<sig>.partial/`` (a
stable name, so checkpoints there let a killed run resume) and is renamed into place on success.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from experiments import tracking
from experiments.config import STAGES, ConfigError
from experiments.hashing import short_hash, subtree
from experiments.stages import finetune as finetune_stage

STAGE_FUNCTIONS = {
    "finetune": "experiments.stages.finetune:run_finetune",
    "generate": "experiments.generate_stage:run_generate",
    "validate": "experiments.validate_stage:run_validate",
    "segment": "experiments.segment_stage:run_segment",
}


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
    """The config values a stage's result depends on (its own part of the signature)."""
    if stage == "finetune":
        return finetune_stage.inputs(cfg)
    data = subtree(cfg, "data")
    if stage == "generate":
        inputs = {"data": data, "generation": subtree(cfg, "generation"), "method": cfg.augment.method}
        if cfg.augment.method == "copy_paste" and COPY_PASTE_VERSION > 1:
            inputs["copy_paste_version"] = COPY_PASTE_VERSION  # only copy-paste outputs are recomputed
        if cfg.augment.method == "diffusion":
            inputs["diffusion_prompt"] = cfg.diffusion.prompt
            if cfg.validator.mode == "single_step" and cfg.validator.early_reject_t is not None:
                # early rejection trains the latent validator in generate and stops samples at θ
                inputs["early_reject"] = {k: cfg.validator[k] for k in
                                          ("early_reject_t", "iou_threshold", "t_eval", "train_steps", "lr")}
        return inputs
    if stage == "validate":
        validator = subtree(cfg, "validator")
        if validator.get("calibrate_real_pass") is None:  # the floor only acts on a calibrated θ
            validator.pop("calibrate_min_threshold", None)
        inputs = {"validator": validator, "base_model": cfg.diffusion.base_model,
                  "prompt": cfg.diffusion.prompt}
        if cfg.validator.mode == "pixel":  # the pixel gate trains a segmenter on the real pairs
            inputs["segmenter"] = subtree(cfg, "segmenter")
        return inputs
    if stage == "segment":
        return {"data": data, "augment": subtree(cfg, "augment"), "segmenter": subtree(cfg, "segmenter"),
                "trainer": subtree(cfg, "trainer"), "seed": cfg.seed}
    raise ConfigError(f"Unknown stage '{stage}'; choose from {', '.join(STAGES)}.")


# Bump a stage's number when its code changes what it produces for the same config: its cached
# results (and, through the upstream signatures, everything downstream) are then recomputed.
# Version 0 adds nothing to the hash, so results cached before versions existed stay valid.
STAGE_VERSIONS: Dict[str, int] = {"finetune": finetune_stage.VERSION, "generate": 0, "validate": 0, "segment": 0}
# The copy-paste generator's own version (1 = before versions existed): 2 = robust (median/MAD)
# colour statistics, so vessels around a fundus disc no longer darken the pasted one.
COPY_PASTE_VERSION = 2


def signature(cfg: DictConfig, stage: str, upstream_sigs: Dict[str, str]) -> str:
    """A short stable hash of a stage's inputs, its code version and its upstream signatures."""
    payload = {"stage": stage, "inputs": stage_inputs(cfg, stage), "upstream": upstream_sigs}
    if STAGE_VERSIONS.get(stage):
        payload["version"] = STAGE_VERSIONS[stage]
    return short_hash(payload)


def signatures(cfg: DictConfig) -> Dict[str, str]:
    """Signature of every stage the experiment needs."""
    sigs: Dict[str, str] = {}
    for stage in required_stages(cfg):
        sigs[stage] = signature(cfg, stage, {s: sigs[s] for s in upstream_of(cfg, stage)})
    return sigs


def _stage_function(stage: str) -> Callable[..., Dict[str, float]]:
    module_name, func_name = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def read_done(stage_dir: Path) -> Optional[Dict[str, float]]:
    """Metrics of a finished stage folder, or None if it is not finished."""
    marker = stage_dir / "DONE"
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _finish(partial: Path, final: Path, metrics: Dict[str, float]) -> None:
    """Write the DONE marker and move the stage folder into place atomically."""
    tmp = partial / "DONE.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, partial / "DONE")
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
               run: Any = None, datamodule: Any = None) -> PipelineResult:
    """Run (or reuse) the target stages and everything upstream of them.

    Args:
        cfg: resolved config.
        targets: stages to produce; default ``cfg.stages``. Upstream stages are computed too
            (or reused from the cache).
        force: stages to recompute even when cached.
        run: the active MLflow run (stage outputs are logged to it), or None.
        datamodule: an already set-up datamodule to reuse (sweeps build it once).

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
    if run is not None:
        tracking.log_data_inputs(cfg, datamodule)
    root = Path(cfg.artifacts_dir)
    result = PipelineResult()
    for stage in todo:
        ups = upstream_of(cfg, stage)
        sig = signature(cfg, stage, {s: result.sigs[s] for s in ups})
        final, partial = root / stage / sig, root / stage / f"{sig}.partial"
        with _stage_lock(root / stage / f"{sig}.lock"):  # workers sharing artifacts/ compute a stage once
            metrics = None if stage in force else read_done(final)
            result.cached[stage] = metrics is not None
            if metrics is None:
                metrics = _compute(cfg, stage, datamodule, partial, final,
                                   {s: result.stage_dirs[s] for s in ups}, run)
            else:
                print(f"[meddiffaug] stage {stage} ({sig}) cached at {final}", flush=True)
        result.sigs[stage], result.stage_dirs[stage] = sig, final
        result.metrics.update(metrics)
        if run is not None:
            tracking.log_metrics(metrics)
            tracking.log_stage_folder(final, stage)
    return result


def _compute(cfg: DictConfig, stage: str, datamodule: Any, partial: Path, final: Path,
             upstream: Dict[str, Path], run: Any) -> Dict[str, float]:
    partial.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"[meddiffaug] stage {stage} ({final.name}) running in {partial}", flush=True)
    logger = tracking.lightning_logger(run, cfg) if stage in ("finetune", "segment") else None
    metrics = _stage_function(stage)(cfg, datamodule, partial, upstream, logger=logger)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics[f"time/{stage}_s"] = round(time.time() - start, 2)
    print(f"[meddiffaug] stage {stage} ({final.name}) done in {metrics[f'time/{stage}_s']:.1f} s", flush=True)
    if tracking.is_rank_zero():
        _finish(partial, final, metrics)
    return metrics


@contextlib.contextmanager
def _stage_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory file lock (released by the OS if the holder is killed)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_datamodule(cfg: DictConfig) -> Any:
    """Create and set up the datamodule of ``cfg.data``; write its split file next to the run."""
    from datamodules import create_datamodule

    kwargs = OmegaConf.to_container(cfg.data, resolve=True)
    name = kwargs.pop("name")
    datamodule = create_datamodule(name, **kwargs)
    datamodule.setup()
    split_dir = Path(cfg.output_dir) / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    datamodule.write_split(split_dir / f"{name}_seed{cfg.data.split_seed}_n{cfg.data.n_real}.json")
    return datamodule


def run_pipeline(cfg: DictConfig, targets: Optional[Iterable[str]] = None, force: Iterable[str] = (),
                 run_name: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
                 nested: bool = False, experiment: Optional[str] = None,
                 datamodule: Any = None) -> PipelineResult:
    """Run the pipeline inside one MLflow run tagged with every stage signature."""
    sigs = signatures(cfg)
    run_tags = {"stage": ",".join(targets or cfg.stages), "method": cfg.augment.method,
                **{f"sig_{k}": v for k, v in sigs.items()}, **(tags or {})}
    run_tags["sig"] = sigs[required_stages(cfg)[-1]]
    with tracking.start_run(cfg, run_name or cfg.name, tags=run_tags, nested=nested,
                            experiment=experiment) as run:
        result = run_stages(cfg, targets, force, run=run, datamodule=datamodule)
        result.run_id = run.info.run_id if run is not None else None
    return result
