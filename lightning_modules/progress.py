"""Progress bars for the long loops (latent caches, gate data, scoring) and for step-bounded training.

A bar on a terminal only: in a log file or a CI job every redraw would be a line of noise, so there the
loop prints nothing and the caller writes one line when it ends.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

from lightning_modules.terminal import on_terminal


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "it") -> Iterable:
    """``iterable`` wrapped in a tqdm bar on a terminal, unchanged elsewhere."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not on_terminal())


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting optimizer steps up to ``max_steps``.

    A training bounded by steps runs with ``max_epochs=-1``: Lightning's default bar then reads
    "Epoch 0/-2" and counts batches, which are not steps under gradient accumulation.

    Args:
        description: the bar's label (e.g. "fine-tune").
    """

    def __init__(self, description: str = "steps"):
        super().__init__()
        self.description = description

    def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description(f"{self.description} steps")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()


def step_bar(description: str) -> list:
    """``[StepProgressBar(description)]`` on a terminal, else ``[]`` (a Trainer built without a bar
    refuses a progress-bar callback)."""
    return [StepProgressBar(description)] if on_terminal() else []
