"""What the stage cache buys a sweep: a 12-trial study vs one uncached trial.

``python -m benchmarks.sweep [--trials 12]``

On the tiny preset (procedural_polyp_diffaug with small overrides), first times ONE uncached
trial (the whole pipeline into a fresh artifacts dir), then a TPE study of ``--trials`` trials over
``validator.iou_threshold`` (float), ``generation.guidance_scale`` (3 values) and ``augment.ratio``
(float) in its own fresh artifacts dir. Without the cache the study would cost about
``trials x one_trial_s``; with it, the diffusion model is fine-tuned once and each trial only
regenerates (new guidance), re-filters (new θ) and retrains the segmenter.
Prints ONE JSON line: ``{"trials", "sweep_s", "one_trial_s", "ratio"}`` (ratio = sweep_s / one_trial_s).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

BASE = "experiments/configs/procedural_polyp_diffaug.yaml"
TINY = ["data.n_procedural=96", "data.n_real=8", "data.batch_size=8", "diffusion.steps=30",
        "generation.n_samples=8", "generation.steps=5", "generation.batch_size=8", "validator.train_steps=20",
        "trainer.max_epochs=3", "trainer.log_every_n_steps=1"]
SPACE = {"validator.iou_threshold": {"type": "float", "low": 0.5, "high": 0.9},
         "generation.guidance_scale": {"type": "categorical", "choices": [2.0, 4.0, 7.5]},
         "augment.ratio": {"type": "float", "low": 0.5, "high": 3.0}}


def _base_model(tmp: Path) -> str:
    """The shipped tiny base, or an untrained tiny model of the same shape when it is missing."""
    from lightning_modules.tiny_base import TINY_DIR, build_tiny_components, save_components

    if (TINY_DIR / "unet").is_dir():
        return "tiny"
    save_components(build_tiny_components(tmp / "tok"), tmp / "base")
    print("[benchmark] shipped tiny base missing: using an untrained tiny model (timings still valid)",
          file=sys.stderr)
    return str(tmp / "base")


def _common(tmp: Path, name: str, base_model: str) -> list:
    return [*TINY, f"diffusion.base_model={base_model}", f"output_dir={tmp}/{name}/out",
            f"artifacts_dir={tmp}/{name}/artifacts", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"tracking.artifact_root={tmp}/mlruns", f"data.cache_dir={tmp}/cache"]


def main(argv: list | None = None) -> int:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args(argv)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the benchmark's runs stay in its temp dir
    from experiments.config import load_config
    from experiments.runner.pipeline import run_pipeline
    from sweeps.study import main as sweep_main

    import mlflow  # noqa: F401 - imported before the clocks start: both timings exclude import cost
    import optuna  # noqa: F401

    import experiments.runner.pipeline  # noqa: F401 - imports every stage module, before the clocks start
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as name:
        tmp = Path(name)
        base_model = _base_model(tmp)
        # Quiet stage logs go to stderr so stdout holds only the JSON line.
        with contextlib.redirect_stdout(sys.stderr):
            middle = ["validator.iou_threshold=0.7", "generation.guidance_scale=4.0", "augment.ratio=1.75"]
            cfg = load_config(BASE, _common(tmp, "one", base_model) + middle)
            start = time.perf_counter()
            run_pipeline(cfg, run_name="one-trial", experiment="bench_one_trial")
            one_trial_s = time.perf_counter() - start

            study = {"study_name": "bench_sweep", "base_config": str(Path(BASE).resolve()),
                     "overrides": _common(tmp, "sweep", base_model), "storage": f"sqlite:///{tmp}/optuna.db",
                     "sampler": {"type": "tpe", "seed": 0}, "pruner": "none", "n_trials": args.trials,
                     "search_space": SPACE}
            path = tmp / "study.yaml"
            path.write_text(yaml.safe_dump(study))
            start = time.perf_counter()
            sweep_main([str(path), "--no-plots"])
            sweep_s = time.perf_counter() - start
    print(json.dumps({"trials": args.trials, "sweep_s": round(sweep_s, 2), "one_trial_s": round(one_trial_s, 2),
                      "ratio": round(sweep_s / one_trial_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
