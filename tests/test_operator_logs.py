"""Logs for files: no progress bars off a terminal, no third-party tips, a short log per cell; cores shared per host."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_trainer_off_a_terminal_has_no_bar_and_logs_within_the_run(tmp_path):
    from experiments.config import load_config
    from experiments.runner.trainer import build_trainer

    cfg = load_config(overrides=["trainer.log_every_n_steps=10"])
    trainer = build_trainer(cfg, tmp_path, train_batches=3)  # pytest captures stdout: not a terminal
    assert trainer.progress_bar_callback is None
    assert trainer.log_every_n_steps == 3  # a 3-batch epoch still logs its curves
    assert build_trainer(cfg, tmp_path, train_batches=50).log_every_n_steps == 10


def test_trainable_modules_start_fit_in_train_mode_and_frozen_ones_stay(tmp_path):
    import lightning as L
    import torch
    from torch import nn

    from experiments.config import load_config
    from experiments.runner.trainer import build_trainer

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.trained = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
            self.frozen = nn.Linear(2, 2).requires_grad_(False)
            self.seen = None

        def training_step(self, batch, _):
            self.seen = (self.trained.training, self.trained[1].training, self.frozen.training)
            return self.trained(self.frozen(batch[0])).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.trained.parameters(), lr=0.1)

    model = Model().eval()  # as after an evaluation pass
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 2)), batch_size=2)
    cfg = load_config(overrides=["trainer.max_steps=1", "trainer.max_epochs=1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_trainer(cfg, tmp_path, train_batches=1, limit_val_batches=0).fit(model, data)
    assert model.seen == (True, True, False)
    # Lightning's count of eval-mode modules is dropped at its source (only frozen ones are left)
    assert not [w for w in caught if "eval mode" in str(w.message)]


def test_lightning_tips_are_dropped_where_they_are_logged(caplog):
    from experiments.runner.console import quiet_third_party

    quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        log.info("💡 Tip: try installing [litmodels](https://pypi.org/project/litmodels/)")
        log.info("TPU available: False, using: 0 TPU cores")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_workers_of_one_host_split_its_cores(monkeypatch, capsys):
    import torch

    from sweeps.cores import CoreShare, cores_given

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # 4 cores, every worker on all
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert cores_given() == (2, "SLURM_CPUS_PER_TASK")
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        share = CoreShare()
        assert share.update([os.getpid()]) == 4 and torch.get_num_threads() == 4
        assert share.update([os.getpid(), other.pid]) == 2 and torch.get_num_threads() == 2
        out = capsys.readouterr().out
        assert "[grid] 2 torch threads: 4 cores (CPU affinity) shared by 2 workers of this host" in out
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting wins
        assert share.update([os.getpid(), other.pid]) == 1
    finally:
        other.kill()
        other.wait()
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_tiny_cells_worker_log_in_a_file_is_short_and_plain(tmp_path):
    from fakes import tiny_grid_file

    path = tiny_grid_file(tmp_path, "t_log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDDIFFAUG_RECORDS_DIR": str(tmp_path / "records")}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = tmp_path / "worker.log"
    with open(log, "w") as handle:  # as under nohup or SLURM: stdout and stderr in one file
        code = subprocess.call([sys.executable, "-m", "sweeps.cli", "grid", str(path)], cwd=REPO, env=env,
                               stdout=handle, stderr=subprocess.STDOUT, timeout=900)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "\r" not in text
    for noise in ("litlogger", "LeafSpec", "in eval mode", "logging interval", "TPU available", "it/s"):
        assert noise not in text, noise
    lines = text.splitlines()
    assert len(lines) < 40, text
    assert "[grid] 1 torch thread: OMP_NUM_THREADS is set" in lines
    assert any(line.startswith("[grid] cell 1/1 default/seed0") and line.endswith("started") for line in lines)
    assert any(line.startswith("[grid] cell 1/1 default/seed0 done in") for line in lines)
    for stage in ("finetune", "generate", "validate", "segment"):
        assert sum(f"stage {stage} (" in line and " done in " in line for line in lines) == 1, stage
