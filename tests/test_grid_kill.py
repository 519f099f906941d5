"""A grid cell killed during generate is not done: the same grid command runs it again, and the table counts it once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cell_killed_during_generate_is_rerun_and_counted_once(tmp_path):
    import mlflow

    from experiments.reporting.sources import collect_runs
    from lightning_modules.tiny_base import build_tiny_components, save_components

    base = tmp_path / "base"
    save_components(build_tiny_components(tmp_path / "tok", width="test", image_size=32), base)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    grid = {"name": "t_kill", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml", "seeds": [0],
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"data.cache_dir={tmp_path}/cache", f"tracking.uri={uri}",
                          f"diffusion.base_model={base}", "diffusion.steps=2", "diffusion.batch_size=2",
                          "data.image_size=32", "data.n_procedural=40", "data.n_real=4", "data.batch_size=4",
                          "generation.n_samples=24", "generation.steps=8", "generation.batch_size=4",
                          "validator.train_steps=2", "trainer.max_steps=2", "trainer.val_check_interval=1"]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "sweeps.cli", "grid", str(path)]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list((tmp_path / "artifacts" / "generate").glob("*.partial")):
        assert first.poll() is None and time.time() < deadline, "the cell ended before generate could be killed"
        time.sleep(0.2)
    time.sleep(1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    mlflow.set_tracking_uri(uri)
    (killed,) = mlflow.search_runs(experiment_names=["t_kill"], output_format="list")
    assert killed.info.status != "FINISHED", "the fine-tune's logger must not end the pipeline's run"
    dry = subprocess.run(command + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "1 cells: 0 done, 0 running, 0 waiting, 0 retried, 1 failed, 0 todo" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    status = subprocess.run(command + ["--status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert f"{first.pid} died (its process is gone)" in status.stdout, status.stdout  # the next worker re-queues it

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    runs = {r.info.run_id: r for r in mlflow.search_runs(experiment_names=["t_kill"], output_format="list")}
    assert runs[killed.info.run_id].info.status == "KILLED"  # the dead worker's run is closed, not trusted
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert len(finished) == 1 and "test/dice" in finished[0].data.metrics
    assert len(collect_runs("t_kill", tracking_uri=uri)) == 1
