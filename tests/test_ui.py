"""``meddiffaug ui`` starts MLflow from a fresh shell (no venv on PATH) and prints the runs table's URL."""
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakes import free_port
from experiments.ui import mlflow_ui_command, runs_table_url


def test_ui_uses_the_running_interpreter_not_path():
    command = mlflow_ui_command("sqlite:///x.db", "127.0.0.1", 5001)
    assert command[:3] == [sys.executable, "-m", "mlflow"]
    assert runs_table_url("127.0.0.1", 5001, "7") == "http://127.0.0.1:5001/#/experiments/7/runs"


@pytest.mark.slow
def test_ui_starts_without_the_venv_on_path_and_answers_200(tmp_path):
    script = Path(sys.executable).parent / "meddiffaug"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    env["PATH"] = "/usr/bin:/bin"  # what a fresh shell has: no .venv/bin
    process = subprocess.Popen([str(script), "ui", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
                break
            except OSError:
                time.sleep(1)
        assert status == 200, f"UI did not answer; exit {process.poll()}"
    finally:
        os.killpg(process.pid, 15)
        output, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in output


def test_each_split_is_logged_as_a_dataset_input(tmp_path, monkeypatch):
    import mlflow

    from experiments.config import load_config
    from experiments.tracking import log_data_inputs
    from fakes import FakeDataModule

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("experiments/configs/procedural_polyp_baseline.yaml", [])
    datamodule = FakeDataModule(cfg)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    # an explicit experiment: another test's active experiment id must not leak into this store
    with mlflow.start_run(experiment_id=mlflow.create_experiment("inputs")) as run:
        log_data_inputs(cfg, datamodule)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    contexts = sorted(next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs)
    assert contexts == ["test", "train_few", "val"]
    assert {i.dataset.name for i in inputs} == {"procedural_polyp/train_few", "procedural_polyp/val",
                                                "procedural_polyp/test"}
