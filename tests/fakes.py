"""The tests' shared fakes: fake pipeline stages, a fake datamodule, tiny dataset writers.

Tests import this module (``import fakes``), never another test module. ``install()`` points
``experiments.pipeline.STAGE_FUNCTIONS`` at the fake stages below and replaces the
datamodule builder, so the real pipeline (signatures, cache, MLflow runs) runs around stages that
take milliseconds. Every stage call appends one line to ``$FAKE_STAGE_CALLS/<stage>`` (or
``<cfg.output_dir>/fake_calls/<stage>``), so tests count invocations across processes.
``FAKE_SEGMENT_SLEEP`` (seconds) makes the segment stage slow enough to be killed mid-trial;
``FAKE_SEGMENT_FAIL_RATIO`` / ``FAKE_PRUNE_RATIO`` make it fail / prune at that ``augment.ratio``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

STAGES = ("finetune", "generate", "validate", "segment")


def _record(cfg: Any, stage: str, workdir: Path, event: str = "call") -> None:
    folder = Path(os.environ.get("FAKE_STAGE_CALLS") or Path(cfg.output_dir) / "fake_calls")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stage}.{event}", "a") as handle:  # one short O_APPEND write: atomic
        handle.write(f"{workdir.name}\n")


def fake_dice(cfg: Any) -> float:
    """A deterministic, smooth val/dice: best at θ = 0.7, ratio = 2, higher guidance a bit better."""
    theta, ratio = float(cfg.validator.iou_threshold), float(cfg.augment.ratio)
    value = 0.8 - (theta - 0.7) ** 2 - 0.01 * (ratio - 2.0) ** 2 + 0.001 * float(cfg.generation.guidance_scale)
    if cfg.augment.method in ("standard", "none"):
        value = 0.6
    return round(value + 0.001 * int(cfg.seed), 6)


def run_finetune(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "finetune", workdir)
    (workdir / "weights.txt").write_text("fake")
    return {"ft/loss": 0.1}


def run_generate(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "generate", workdir)
    (workdir / "manifest.jsonl").write_text(json.dumps({"id": "s0"}) + "\n")
    return {"gen/seconds": 0.01}


def run_validate(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    _record(cfg, "validate", workdir)
    (workdir / "accepted.jsonl").write_text("")
    return {"gen/accept_rate": 1.0 - float(cfg.validator.iou_threshold) / 2}


def run_segment(cfg, datamodule, workdir, upstream, logger=None, **kwargs) -> Dict[str, float]:
    from sweeps.study import current_trial

    _record(cfg, "segment", workdir, "start")
    time.sleep(float(os.environ.get("FAKE_SEGMENT_SLEEP", "0")))
    ratio = float(cfg.augment.ratio)
    if os.environ.get("FAKE_SEGMENT_FAIL_RATIO") and ratio == float(os.environ["FAKE_SEGMENT_FAIL_RATIO"]):
        raise RuntimeError(f"fake segment failure at ratio {ratio}")
    if os.environ.get("FAKE_PRUNE_RATIO") and ratio == float(os.environ["FAKE_PRUNE_RATIO"]):
        import optuna  # what PyTorchLightningPruningCallback raises from inside trainer.fit

        raise optuna.TrialPruned("fake prune")
    _record(cfg, "segment", workdir)
    dice = fake_dice(cfg)
    return {"val/dice": dice, "test/dice": dice - 0.05, "fake/in_trial": float(current_trial() is not None)}


class FakeDataModule:
    """Stands in for a set-up datamodule; the fake stages never read it."""

    def __init__(self, cfg: Any):
        self.name = cfg.data.name
        self.ids = [f"fake{i}" for i in range(6)]
        self.split_indices = {"train": [0, 1, 2, 3], "train_few": [0, 1], "val": [4], "test": [5]}


def install(monkeypatch: Any = None) -> None:
    """Route the pipeline to the fake stages (through ``monkeypatch`` in tests, directly in scripts)."""
    from experiments import pipeline, tracking

    module = sys.modules[__name__]
    table = {stage: getattr(module, f"run_{stage}") for stage in STAGES}
    replacements = [(pipeline, "STAGE_FUNCTIONS", table),
                    (pipeline, "build_datamodule", FakeDataModule),
                    # The real logger imports Lightning (seconds per process); fakes log nothing.
                    (tracking, "lightning_logger", lambda run, cfg: None)]
    for target, name, value in replacements:
        if monkeypatch is not None:
            monkeypatch.setattr(target, name, value)
        else:
            setattr(target, name, value)


def calls(folder: Path, stage: str, event: str = "call") -> int:
    """How many times ``stage`` was entered (``start``) or finished (``call``)."""
    path = Path(folder) / f"{stage}.{event}"
    return len(path.read_text().splitlines()) if path.exists() else 0
