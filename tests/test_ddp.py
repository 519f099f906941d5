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
    command = [sys.executable, "-m", "sweeps.cli", "run", "experiments/configs/procedural_polyp_baseline.yaml",
               "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "data.n_procedural=40", "data.image_size=32", "data.batch_size=4", "data.n_real=8",
               "segmenter.collapse_dice=0",  # 4 steps may stay under the collapse line (exit 3)
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


def _tiny_pipeline(tmp_path):
    """Overrides for the whole diffusion pipeline on tiny data, with its stores in tmp_path."""
    from lightning_modules.tiny_base import build_tiny_components, save_components

    base = tmp_path / "base"
    save_components(build_tiny_components(tmp_path / "tok", width="test", image_size=32), base)
    return ["experiments/configs/procedural_polyp_diffaug.yaml", "trainer.strategy=ddp",
            f"diffusion.base_model={base}", "diffusion.steps=2", "diffusion.batch_size=2", "data.image_size=32",
            "data.n_procedural=40", "data.n_real=4", "data.batch_size=2", "generation.n_samples=8",
            "generation.steps=2", "generation.batch_size=4", "validator.train_steps=2", "trainer.max_steps=2",
            "trainer.val_check_interval=1",
            # 2-step models: accept every pair and never call the segmenter collapsed (either would exit 3)
            "validator.iou_threshold=0.0", "segmenter.collapse_dice=0",
            f"artifacts_dir={tmp_path}/artifacts", f"output_dir={tmp_path}/outputs",
            f"data.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]


def _failure_report(done) -> str:
    """Every rank's error lines first (the failing rank is often not the one whose traceback is last)."""
    text = done.stdout + done.stderr
    errors = [line for line in text.splitlines() if "error" in line.lower() and "Traceback" not in line]
    return "\n".join(errors)[-3000:] + "\n---- tail ----\n" + text[-2000:]


def _check_every_rank_trained(outputs):
    """Fine-tune, the gate's model and the segmenter trained under DDP on both ranks, once each."""
    for rank, output in enumerate(outputs):
        for what in ("finetune", "validate (its model)", "segment"):
            line = f"rank {rank}/2 joins training (gloo): {what}"
            assert output.count(line) == 1, f"{line!r} not once in:\n{output[-3000:]}"


def _check_one_finished_pipeline(tmp_path):
    import mlflow

    artifacts = tmp_path / "artifacts"
    for stage in ("finetune", "generate", "validate", "segment"):
        assert len(list((artifacts / stage).glob("*/DONE"))) == 1, stage
    leftovers = [p.name for p in artifacts.glob("*/*") if p.name.endswith((".partial", ".lock"))]
    assert not leftovers, leftovers
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["procedural_polyp_diffaug"], output_format="list")
    assert run.info.status == "FINISHED" and "test/dice" in run.data.metrics


@pytest.mark.slow
def test_whole_pipeline_under_torchrun_two_cpu_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sweeps.cli", "run", *_tiny_pipeline(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, _failure_report(done)
    _check_every_rank_trained([done.stdout] * 2)
    _check_one_finished_pipeline(tmp_path)


@pytest.mark.slow
def test_whole_pipeline_with_slurm_variables_two_cpu_tasks(tmp_path):
    """What ``srun --ntasks-per-node 2`` sets, by hand: Lightning's SLURMEnvironment drives the ranks."""
    from fakes import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_TRACKING_URI"))}
    env.update(OMP_NUM_THREADS="1", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1",
               SLURM_NODEID="0", SLURM_JOB_NAME="meddiffaug-test", SLURM_JOB_ID="4242",
               SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port))
    # the pixel gate here (its segmenter trains under DDP), the latent validator under torchrun above
    command = [sys.executable, "-m", "sweeps.cli", "run", *_tiny_pipeline(tmp_path), "validator.mode=pixel"]
    tasks = [subprocess.Popen(command, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [t.communicate(timeout=900)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _check_every_rank_trained(outputs)
    _check_one_finished_pipeline(tmp_path)
