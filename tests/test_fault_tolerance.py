"""A fine-tune killed with SIGKILL resumes from its last checkpoint when the command is rerun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightning_modules.tiny_base import build_tiny_components, save_components


@pytest.mark.slow
def test_killed_finetune_resumes_from_last_checkpoint(tmp_path):
    base = tmp_path / "base"
    save_components(build_tiny_components(tmp_path / "tok", width="test", image_size=32), base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "sweeps.cli", "run", "experiments/configs/procedural_polyp_diffaug.yaml",
               "--stages", "finetune", f"diffusion.base_model={base}", "diffusion.steps=400",
               "diffusion.checkpoint_every=5", "diffusion.batch_size=2", "data.image_size=32",
               "data.n_procedural=40", "data.n_real=4", f"artifacts_dir={tmp_path}/artifacts",
               f"output_dir={tmp_path}/outputs", f"data.cache_dir={tmp_path}/cache",
               f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finetune_dir = tmp_path / "artifacts" / "finetune"
    deadline = time.time() + 300
    while time.time() < deadline and not list(finetune_dir.glob("*.partial/checkpoints/last.ckpt")):
        assert first.poll() is None, "the fine-tune ended before it could be killed; raise diffusion.steps"
        time.sleep(0.5)
    time.sleep(2)  # let it train past the first checkpoint
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not [d for d in finetune_dir.iterdir() if (d / "DONE").exists()], "killed run must not look finished"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint" in second.stdout + second.stderr
    out = json.loads(second.stdout[second.stdout.rindex("\n{") + 1:])
    assert out["metrics"]["ft/steps"] == 400
    done = finetune_dir / out["sigs"]["finetune"]
    assert (done / "DONE").is_file() and (done / "trained.safetensors").is_file()
