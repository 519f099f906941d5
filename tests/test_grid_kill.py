"""A grid cell killed during generate is not done: the same grid command runs it again, and the table counts it once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cell_killed_during_generate_is_rerun_and_counted_once(tmp_path):
    import mlflow

    from experiments.reporting.sources import collect_runs
    from fakes import tiny_grid_file

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = tiny_grid_file(tmp_path, "t_kill", n_samples=24, steps=8)
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
