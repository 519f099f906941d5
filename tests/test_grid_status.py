"""``meddiffaug grid --status``: each cell's state read from the queue (a live and a killed worker), MLflow and the records."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from postgres_fixture import new_database, postgres_server  # noqa: F401  (fixture)


def write_grid(tmp_path: Path) -> Path:
    """A 5-cell grid (one per augment.ratio) whose MLflow store and artifacts live in tmp_path."""
    spec = {"name": "t_status", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"],
            "axes": {"augment.ratio": [1, 2, 3, 4, 5]}, "seeds": [0]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _lines(out: str) -> dict:
    """Cell label's ratio -> its status line."""
    return {line.split("ratio=")[1].split("/")[0]: line for line in out.splitlines() if "ratio=" in line}


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def test_status_shows_done_running_dead_waiting_and_retried_cells(tmp_path, fakes, capsys, request, backend):
    from sweeps.grid import default_storage, grid_cells, main
    from sweeps.queue import CellQueue

    path = str(write_grid(tmp_path))
    cells = grid_cells(path)
    url = default_storage(cells[0].config()) if backend == "sqlite" else new_database(request.getfixturevalue("postgres_server"))
    assert main([path, "--only", "augment.ratio=1", "--storage", url]) == 0  # one cell done, timed by the queue
    capsys.readouterr()

    queue = CellQueue(url, "t_status")
    key = {int(c.axes["augment.ratio"]): c.key() for c in cells}
    assert queue.enqueue({key[r]: {"cell": "x"} for r in (2, 3, 4, 5)}) == 4
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    live, dead = subprocess.Popen(sleeper), subprocess.Popen(sleeper)
    dead.kill()  # a worker killed in the middle of its cell (SIGKILL: no cleanup ran)
    dead.wait()
    host = socket.gethostname()
    try:
        claims = {}
        for ratio, worker in ((2, {"host": host, "pid": live.pid}), (3, {"host": host, "pid": dead.pid}),
                              (5, {"host": "other-machine", "pid": 7})):
            claims[ratio] = queue.claim({key[ratio]})
            queue.storage.set_trial_system_attr(claims[ratio].trial_id, "worker", worker)
        queue.set_stage(claims[2], "generate")
        queue.storage.set_trial_system_attr(claims[5].trial_id, "beat", time.time() - 600)  # silent for 10 min

        assert main([path, "--status", "--storage", url]) == 0
        out = capsys.readouterr().out
        lines = _lines(out)
        assert lines["1"].startswith("done") and lines["4"].startswith("waiting")
        assert lines["2"].startswith("running") and f"worker {host}:{live.pid}, stage generate, heartbeat" in lines["2"]
        assert lines["3"].startswith("failed") and f"worker {host}:{dead.pid} died (its process is gone)" in lines["3"]
        assert lines["5"].startswith("failed") and "other-machine:7 died (no heartbeat for 10 min)" in lines["5"]
        assert "grid t_status: 5 cells: 1 done, 1 running, 1 waiting, 0 retried, 2 failed, 0 todo; about " in out
        assert "left at 1 worker (median of 1 finished cells)" in out

        assert queue.reap() == 1  # what the next worker to poll does: the killed local worker's cell re-queued
        assert main([path, "--dry-run", "--storage", url]) == 0
        lines = _lines(capsys.readouterr().out)
        assert lines["3"].startswith("retried") and "augment.ratio=3" in lines["3"]  # --dry-run: the overrides
        assert main([path, "--status", "--storage", url]) == 0
        lines = _lines(capsys.readouterr().out)
        assert f"re-queued (retry 1): trial {claims[3].number} of worker {host}:{dead.pid} died" in lines["3"]
        assert lines["2"].startswith("running") and lines["5"].startswith("failed")
    finally:
        live.kill()
        live.wait()


def test_status_without_a_queue_reads_the_records_and_names_each_grid(tmp_path, fakes, capsys):
    from sweeps.grid import main

    path = str(write_grid(tmp_path))
    assert main([path, "--rerun", "--only", "augment.ratio=1"]) == 0  # no queue: done in MLflow and the records
    (tmp_path / "mlflow.db").unlink()  # a fresh machine: only the committed records know the cell
    capsys.readouterr()
    assert main([path, path, "--status"]) == 0
    out = capsys.readouterr().out
    assert out.count("grid t_status: 5 cells: 1 done, 0 running, 0 waiting, 0 retried, 0 failed, 4 todo") == 2
    assert "left at 1 worker (median of 1 finished cells)" in out  # the record's stage times
    assert not (tmp_path / "optuna.db").exists()  # looking created no queue


def test_running_a_grid_takes_one_grid(tmp_path):
    from experiments.config import ConfigError
    from sweeps.grid import main

    path = str(write_grid(tmp_path))
    with pytest.raises(ConfigError, match="one grid to run"):
        main([path, path])


def test_a_cell_run_has_system_metrics_grouping_tags_and_a_description(tmp_path, fakes, monkeypatch):
    import mlflow

    from sweeps.grid import main

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a fake cell lasts a second
    monkeypatch.setenv("FAKE_SEGMENT_SLEEP", "1.5")
    path = str(write_grid(tmp_path))
    assert main([path, "--only", "augment.ratio=2"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["t_status"], output_format="list")
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    tags = run.data.tags
    assert (tags["grid"], tags["variant"], tags["seed"]) == ("t_status", "default", "0")
    note = tags["mlflow.note.content"]
    assert f"Grid `t_status`, cell `default/ratio=2/seed0` (`{tags['cell']}`)" in note
    assert f"Run by `meddiffaug grid {path} --only augment.ratio=2`" in note
    assert f"meddiffaug grid {path} --rerun --only variant=default --only augment.ratio=2 --only seed=0" in note
