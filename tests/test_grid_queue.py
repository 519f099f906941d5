"""Grids and studies across workers on one database: the cell queue (SQLite here, PostgreSQL when slow)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import fakes as fake_stages
from postgres_fixture import new_database, postgres_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent

GRID_RUNNER = """import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import fakes as fake_stages
fake_stages.install()
from sweeps.{module} import main
sys.exit(main(sys.argv[1:]))
"""


def test_duplicate_enqueues_run_once_and_dead_local_worker_is_requeued(tmp_path):
    from optuna.trial import TrialState

    from sweeps.queue import CellQueue

    url = f"sqlite:///{tmp_path}/optuna.db"
    first, second = CellQueue(url, "g"), CellQueue(url, "g")
    cells = {"a": {"cell": "a"}, "b": {"cell": "b"}}
    assert first.enqueue(cells) == 2 and second.enqueue(cells) == 0  # already queued
    first.study.enqueue_trial({}, user_attrs={"key": "a"})  # as a racing worker would
    claims = [first.claim({"a", "b"}), second.claim({"a", "b"}), first.claim({"a", "b"})]
    assert sorted(c.key for c in claims if c) == ["a", "b"] and claims[2] is None
    states = Counter(t.state for t in first.study.trials)
    assert states == {TrialState.RUNNING: 2, TrialState.PRUNED: 1}  # the duplicate was dropped

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held = claims[0]
    first.storage.set_trial_system_attr(held.trial_id, "worker", {"host": first.worker["host"], "pid": dead.pid})
    assert second.reap() == 1  # its worker is gone: failed and re-queued at once, no grace period
    again = second.claim({"a", "b"})
    assert again is not None and again.key == held.key and again.number > held.number
    second.finish(again, 0.5)
    assert not second.pending({held.key})


def write_grid(tmp_path: Path) -> Path:
    """A 4-cell grid (2 ratios x 2 seeds) with MLflow store and artifacts in tmp_path."""
    spec = {"name": "t_grid", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                          f"tracking.artifact_root={tmp_path}/mlruns"],
            "axes": {"augment.ratio": [1, 3]}, "seeds": [0, 1]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _start(tmp_path: Path, module: str, args, env) -> subprocess.Popen:
    runner = tmp_path / f"{module}_runner.py"
    runner.write_text(GRID_RUNNER.format(repo=str(REPO), tests=str(REPO / "tests"), module=module))
    return subprocess.Popen([sys.executable, str(runner), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _env(tmp_path: Path, sleep: str) -> dict:
    env = {**os.environ, "FAKE_STAGE_CALLS": str(tmp_path / "calls"), "FAKE_SEGMENT_SLEEP": sleep,
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _init_mlflow(cfg, experiment: str) -> None:
    """The shared MLflow store exists before the workers start (as a team's server does)."""
    from experiments import tracking

    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the workers' store, whatever another test left set
    tracking.set_experiment(cfg, experiment)


@pytest.mark.slow
def test_two_grid_workers_share_a_postgres_queue(tmp_path, postgres_server):  # noqa: F811
    import mlflow
    import optuna

    from sweeps.grid import grid_cells

    storage = new_database(postgres_server)
    path = write_grid(tmp_path)
    _init_mlflow(grid_cells(path)[0].config(), "t_grid")
    env = _env(tmp_path, "1.5")  # slow enough that the second worker is up before the queue drains
    workers = [_start(tmp_path, "grid", [str(path), "--storage", storage], env) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    calls = tmp_path / "calls"
    assert fake_stages.calls(calls, "segment", "start") == 4 == fake_stages.calls(calls, "segment")
    trials = optuna.load_study(study_name="grid:t_grid", storage=storage).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len({t.user_attrs["key"] for t in complete}) == 4
    assert len({t.system_attrs["worker"]["pid"] for t in complete}) == 2, "both workers ran cells"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["t_grid"], output_format="list")
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 4
    assert len({r.data.tags["cell"] for r in runs}) == 4

    rerun = _start(tmp_path, "grid", [str(path), "--storage", storage], env)  # nothing left to do
    assert rerun.wait(timeout=120) == 0 and fake_stages.calls(calls, "segment") == 4


@pytest.mark.slow
def test_two_sweep_workers_share_a_postgres_study(tmp_path, postgres_server):  # noqa: F811
    import mlflow
    import optuna

    from experiments.config import load_config

    storage = new_database(postgres_server)
    space = {"validator.iou_threshold": {"type": "float", "low": 0.5, "high": 0.9},
             "augment.ratio": {"type": "float", "low": 0.5, "high": 3.0}}
    overrides = [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"]
    spec = {"study_name": "t_pg", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": overrides, "storage": storage, "sampler": {"type": "tpe", "seed": 0},
            "n_trials": 4, "search_space": space}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    _init_mlflow(load_config(REPO / spec["base_config"], overrides), "t_pg")
    env = _env(tmp_path, "0.5")
    workers = [_start(tmp_path, "study", [str(path), "--no-plots"], env) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    trials = optuna.load_study(study_name="t_pg", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 8
    assert len({t.user_attrs["trial_key"] for t in trials}) == 8, "no trial ran the same point twice"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [r for r in mlflow.search_runs(experiment_names=["t_pg"], output_format="list")
            if r.data.tags.get("role") == "trial"]
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 8
    assert len({r.data.tags["trial_key"] for r in runs}) == 8 and len({r.data.tags["trial"] for r in runs}) == 8
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}
    assert fake_stages.calls(tmp_path / "calls", "segment") == 8


def test_a_postgres_url_without_its_driver_says_which_extra_to_install(monkeypatch):
    from sweeps.queue import rdb_storage

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[postgres\]'") as info:
        rdb_storage("postgresql://user:secret@127.0.0.1:1/optuna")
    assert "secret" not in str(info.value)
