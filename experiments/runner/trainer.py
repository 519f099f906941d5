"""The one place a Lightning ``Trainer`` is built from ``cfg.trainer`` (shared by every training stage)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

from experiments.runner.console import quiet_third_party
from lightning_modules.terminal import on_terminal


class TrainMode(L.Callback):
    """Before fit, put every module that holds trainable weights in train mode.

    Lightning keeps each module's mode as it finds it: a module left in eval mode (a model reused
    after a validation pass, or loaded for inference) would train with dropout off and batch-norm
    statistics frozen. Modules whose weights are all frozen keep their mode: the diffusion model's
    VAE and text encoders are in eval mode on purpose.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train(pl_module, parent_trains=True)

    def _train(self, module: Any, parent_trains: bool) -> None:
        params = list(module.parameters())
        # a module without weights (dropout, activations) follows its parent; one whose weights are
        # all frozen keeps its mode, and so does everything in it
        trains = any(p.requires_grad for p in params) if params else parent_trains
        if trains:
            module.training = True
            for child in module.children():
                self._train(child, True)


def build_trainer(cfg: DictConfig, workdir: str | Path, logger: Any = None, callbacks: Iterable[Any] = (),
                  max_steps: Optional[int] = None, train_batches: Optional[int] = None,
                  **overrides: Any) -> L.Trainer:
    """Build a Trainer from ``cfg.trainer``.

    Args:
        cfg: the resolved experiment config (only ``cfg.trainer`` is read).
        workdir: ``default_root_dir`` (stage folder; checkpoints are placed by callbacks).
        logger: a Lightning logger (e.g. MLflow) or None for no logger; ``self.log`` values still
            reach ``trainer.callback_metrics`` and the checkpoint callbacks.
        callbacks: extra callbacks.
        max_steps: overrides ``cfg.trainer.max_steps`` (stages that count optimizer steps).
        train_batches: training batches per epoch; the logging interval is at most this, so a short
            run logs its curves (and Lightning has no interval longer than an epoch to warn about).
        **overrides: any other ``L.Trainer`` keyword (tests use ``limit_train_batches`` ...).

    Returns:
        The Trainer. ``strategy=ddp`` with ``accelerator=cpu`` uses the gloo backend. Its progress
        bar is drawn on a terminal only (:mod:`experiments.runner.console`).
    """
    quiet_third_party()
    t = cfg.trainer
    devices = t.devices
    if OmegaConf.is_config(devices):  # a list of device ids from YAML
        devices = OmegaConf.to_container(devices)
    kwargs = dict(
        accelerator=t.accelerator, devices=devices, strategy=_strategy(t.strategy), precision=t.precision,
        max_epochs=t.max_epochs, max_steps=t.max_steps if max_steps is None else max_steps,
        log_every_n_steps=max(1, min(t.log_every_n_steps, train_batches or t.log_every_n_steps)),
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        deterministic=t.deterministic, enable_progress_bar=on_terminal(), enable_model_summary=False,
        default_root_dir=str(workdir), logger=logger if logger is not None else False,
        callbacks=[TrainMode(), *callbacks],
    )
    if t.val_check_interval:  # step-based validation: same schedule whatever the epoch length
        kwargs.update(val_check_interval=t.val_check_interval, check_val_every_n_epoch=None)
    from experiments.runner.distributed import launcher_devices

    launched = launcher_devices()
    if launched is not None:  # under torchrun/srun every rank joins: the launcher sets the world
        kwargs.update(devices=launched[0], num_nodes=launched[1], strategy="ddp")
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _strategy(name: str) -> str:
    """Map ``ddp`` to ``ddp_spawn`` unless a launcher (torchrun, SLURM) already started the ranks.

    Lightning's plain ``ddp`` re-executes the whole command once per device, which would rerun the
    pipeline's non-training stages in every process; spawning inside ``fit`` keeps the pipeline
    single-process, so only the training step is distributed and only rank 0 writes artifacts.
    """
    from experiments.runner.distributed import launcher

    return "ddp_spawn" if name == "ddp" and launcher() is None else name
