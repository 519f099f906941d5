"""Optuna studies over the pipeline with fake stages: storage, MLflow nesting, dedup, cache, faults."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

import fakes as fake_stages
from experiments.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
SPACE = {"validator.iou_threshold": {"type": "float", "low": 0.5, "high": 0.9},
         "generation.guidance_scale": {"type": "categorical", "choices": [2, 4, 7.5]},
         "augment.ratio": {"type": "float", "low": 0.5, "high": 3.0}}


def write_study(tmp_path: Path, name: str = "t_study", **changes) -> Path:
    """A study YAML whose storage, MLflow store and artifacts all live in ``tmp_path``."""
    spec = {"study_name": name, "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"],
            "storage": f"sqlite:///{tmp_path}/optuna.db", "sampler": {"type": "tpe", "seed": 0},
            "pruner": {"type": "median", "n_startup_trials": 2}, "n_trials": 3, "search_space": SPACE}
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def mlflow_runs(tmp_path: Path, experiment: str = "t_study"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def load(tmp_path: Path, name: str = "t_study"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")


def assert_no_duplicate_finished(runs) -> None:
    keys = Counter(r.data.tags["trial_key"] for r in runs
                   if r.data.tags.get("role") == "trial" and r.info.status == "FINISHED")
    assert keys and max(keys.values()) == 1, keys


def test_study_nests_trials_under_one_parent_and_rerun_adds(tmp_path, fakes):
    from sweeps.study import main

    path = write_study(tmp_path)
    assert main([str(path)]) == 0
    study = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("role") == "study_parent"]
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert all(r.data.metrics["fake/in_trial"] == 1.0 for r in trials)  # the pruning hook sees the trial
    assert {r.data.tags["trial"] for r in trials} == {"0", "1", "2"}
    assert parent.data.metrics["best/val/dice"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    artifacts = {f.path for f in __import__("mlflow").MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= artifacts

    assert main([str(path), "--n-trials", "2", "--no-plots"]) == 0  # the same command resumes
    assert len(load(tmp_path).trials) == 5
    runs = mlflow_runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("role") == "study_parent"]) == 1
    assert len([r for r in runs if r.data.tags.get("role") == "trial"]) == 5
    assert_no_duplicate_finished(runs)


def test_finished_trial_params_reuse_their_run(tmp_path, fakes):
    from sweeps.study import main

    space = {"augment.ratio": {"type": "categorical", "choices": [1.0, 2.0]}}
    path = write_study(tmp_path, search_space=space, sampler={"type": "grid", "seed": 0}, n_trials=None)
    assert main([str(path), "--no-plots"]) == 0  # the grid sampler stops after both points
    assert fake_stages.calls(fakes, "segment") == 2
    study = load(tmp_path)
    study.enqueue_trial({"augment.ratio": 2.0})  # e.g. a retry of a trial whose run had finished
    assert main([str(path), "--n-trials", "1", "--no-plots"]) == 0
    study = load(tmp_path)
    last = study.trials[-1]
    assert last.user_attrs.get("reused") is True and last.state.name == "COMPLETE"
    assert last.value == pytest.approx(study.trials[1].value if study.trials[1].params == last.params
                                       else study.trials[0].value)
    assert fake_stages.calls(fakes, "segment") == 2  # nothing retrained
    runs = mlflow_runs(tmp_path)
    assert len([r for r in runs if r.data.tags.get("role") == "trial"]) == 2
    assert_no_duplicate_finished(runs)


def test_ratio_sweep_finetunes_once(tmp_path, fakes):
    from sweeps.study import main

    path = write_study(tmp_path, search_space={"augment.ratio": SPACE["augment.ratio"]})
    assert main([str(path), "--no-plots"]) == 0
    assert [fake_stages.calls(fakes, s) for s in ("finetune", "generate", "validate", "segment")] == [1, 1, 1, 3]


def test_parallel_trials_share_the_finetune_and_nest(tmp_path, fakes):
    from sweeps.study import main

    path = write_study(tmp_path, search_space={"augment.ratio": SPACE["augment.ratio"]})
    assert main([str(path), "--n-trials", "4", "--n-jobs", "2", "--no-plots"]) == 0
    assert fake_stages.calls(fakes, "finetune") == 1 and fake_stages.calls(fakes, "segment") == 4
    runs = mlflow_runs(tmp_path)
    parent = [r.info.run_id for r in runs if r.data.tags.get("role") == "study_parent"]
    assert len(parent) == 1
    assert [r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("role") == "trial"] == parent * 4


def test_pruned_trial_is_recorded(tmp_path, fakes, monkeypatch):
    from sweeps.study import main

    monkeypatch.setenv("FAKE_PRUNE_RATIO", "3.0")
    space = {"augment.ratio": {"type": "categorical", "choices": [1.0, 3.0]}}
    path = write_study(tmp_path, search_space=space, sampler={"type": "grid", "seed": 0}, n_trials=None)
    assert main([str(path), "--no-plots"]) == 0
    states = {t.params["augment.ratio"]: t.state.name for t in load(tmp_path).trials}
    assert states == {1.0: "COMPLETE", 3.0: "PRUNED"}
    pruned = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("pruned") == "true"]
    assert len(pruned) == 1 and pruned[0].info.status == "KILLED"


@pytest.mark.parametrize("change, needle", [
    ({"search_space": {"validator.iou_treshold": {"type": "float", "low": 0.5, "high": 0.9}}}, "validator.iou_threshold"),
    ({"n_trail": 3}, "n_trail"),
    ({"search_space": {"augment.ratio": {"type": "float", "low": 0.5, "hihg": 3}}}, "hihg"),
    ({"search_space": {"augment.ratio": {"type": "float", "low": 3, "high": 1}}}, "low"),
    ({"sampler": {"type": "cmaes"}}, "cmaes"),
])
def test_bad_study_files_fail_before_any_trial(tmp_path, fakes, change, needle):
    from sweeps.study import main

    with pytest.raises(ConfigError, match=needle):
        main([str(write_study(tmp_path, **change))])
    assert not (tmp_path / "calls").exists()


def test_cli_reports_config_errors(tmp_path, fakes, capsys):
    from sweeps.cli import main

    bad = write_study(tmp_path, search_space={"augment.ration": SPACE["augment.ratio"]})
    assert main(["sweep", str(bad)]) == 2
    assert "augment.ration" in capsys.readouterr().err


def test_pruning_callbacks_only_inside_a_trial():
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    from sweeps import study as study_mod

    assert study_mod.pruning_callbacks() == []
    trial = optuna.create_study().ask()
    token = study_mod._TRIAL.set(trial)
    try:
        callbacks = study_mod.pruning_callbacks()
    finally:
        study_mod._TRIAL.reset(token)
    assert len(callbacks) == 1 and isinstance(callbacks[0], PyTorchLightningPruningCallback)
    assert callbacks[0].monitor == "val/dice"


def test_shipped_studies_parse():
    from sweeps.study import load_study_spec

    for path in sorted((REPO / "sweeps" / "studies").glob("*.yaml")):
        spec = load_study_spec(path)
        assert {p.key for p in spec.space} == set(SPACE), path


RUNNER = """import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import fakes as fake_stages
fake_stages.install()
from sweeps.study import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_worker_trial_is_retried_without_duplicates(tmp_path):
    path = write_study(tmp_path, search_space={"augment.ratio": SPACE["augment.ratio"]},
                       heartbeat_interval=1, grace_period=2)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(repo=str(REPO), tests=str(REPO / "tests")))
    calls = tmp_path / "calls"
    env = {**os.environ, "FAKE_STAGE_CALLS": str(calls), "FAKE_SEGMENT_SLEEP": "2", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, str(runner), str(path), "--n-trials", "4", "--no-plots"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (fake_stages.calls(calls, "segment") >= 2 and fake_stages.calls(calls, "segment", "start") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # mid-trial: trial 2 is inside its (sleeping) segment stage
    proc.wait()
    before = {t.number: (t.state.name, t.value, t.params) for t in load(tmp_path).trials}
    assert [s for s, _, _ in before.values()] == ["COMPLETE", "COMPLETE", "RUNNING"]
    time.sleep(3)  # past the grace period: the RUNNING trial's heartbeat is stale

    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = load(tmp_path).trials
    for number in (0, 1):  # finished trials are kept as they were
        assert (trials[number].state.name, trials[number].value, trials[number].params) == before[number]
    assert trials[2].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == before[2][2]
    assert sum(t.state.name == "COMPLETE" for t in trials) == 6
    runs = mlflow_runs(tmp_path)
    assert_no_duplicate_finished(runs)
    trial_runs = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert sum(r.info.status == "FINISHED" for r in trial_runs) == 6
    killed = [r for r in trial_runs if r.data.tags["trial"] == "2"]
    assert [r.info.status for r in killed] == ["KILLED"]
    assert len([r for r in runs if r.data.tags.get("role") == "study_parent"]) == 1
