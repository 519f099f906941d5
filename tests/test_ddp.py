"""DDP on CPU: two gloo processes train the segment stage; only rank 0 writes artifacts and MLflow."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_segment_stage_under_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "experiments.cli", "run", "experiments/configs/procedural_polyp_baseline.yaml",
               "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "data.n_procedural=40", "data.image_size=32", "data.batch_size=4", "data.n_real=8",
               f"artifacts_dir={tmp_path}/artifacts", f"output_dir={tmp_path}/outputs",
               f"data.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
               f"tracking.artifact_root={tmp_path}/mlruns"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout[done.stdout.rindex("\n{") + 1:])
    assert "test/dice" in out["metrics"]
    stage_dirs = list((tmp_path / "artifacts" / "segment").iterdir())
    assert [d.name for d in stage_dirs if (d / "DONE").is_file()] == [out["sigs"]["segment"]]
    assert not [d for d in stage_dirs if d.name.endswith(".partial")]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["procedural_polyp_baseline"])
    assert len(runs) == 1, "only rank 0 opens an MLflow run"
