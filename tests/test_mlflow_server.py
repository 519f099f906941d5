"""A shared ``mlflow server``: a run's pictures go through the server into its artifact destination."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakes import free_port

REPO = Path(__file__).resolve().parent.parent


def test_artifact_location_follows_the_store(tmp_path, monkeypatch):
    from experiments.config import load_config
    from experiments.tracking import artifact_location

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output_dir={tmp_path}/out"])
    assert artifact_location(cfg, "e") == (tmp_path / "out" / "mlruns").resolve().as_uri() + "/e"
    cfg = load_config(None, [f"tracking.artifact_root={tmp_path}/art"])
    assert artifact_location(cfg, "e") == (tmp_path / "art").resolve().as_uri() + "/e"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert artifact_location(cfg, "e") is None  # the server's proxied artifact store decides


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free port with its own backend store and artifact destination."""
    port, server_dir = free_port(), tmp_path / "server"
    server_dir.mkdir()
    log = open(server_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{server_dir}/db.sqlite",
                             "--artifacts-destination", str(server_dir / "art")],
                            cwd=server_dir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (server_dir / "server.log").read_text()[-3000:]
        time.sleep(1)
    try:
        yield url, server_dir / "art"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_run_pictures_go_through_the_server(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    url, destination = mlflow_server
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "sweeps.cli", "run",
               str(REPO / "experiments/configs/procedural_polyp_baseline.yaml"),
               "trainer.max_steps=2", "trainer.val_check_interval=1", "data.n_procedural=24", "data.image_size=32",
               "data.batch_size=4", "data.n_real=4", "segmenter.collapse_dice=0", f"artifacts_dir={client_dir}/artifacts",
               f"output_dir={client_dir}/outputs", f"data.cache_dir={client_dir}/cache"]
    done = subprocess.run(command, cwd=client_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("procedural_polyp_baseline")
    assert not experiment.artifact_location.startswith("file:")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and "test/dice" in run.data.metrics
    listed = {f.path for f in client.list_artifacts(run.info.run_id, "segment")}
    assert "segment/predictions.png" in listed and "config.yaml" in {f.path for f in client.list_artifacts(run.info.run_id)}
    on_server = [p.relative_to(destination) for p in destination.rglob("predictions.png")]
    assert len(on_server) == 1 and run.info.run_id in str(on_server[0])
    assert not list(client_dir.rglob("mlruns")) and not list(client_dir.rglob("config.yaml")), \
        "no MLflow artifact may land on the client's disk"
