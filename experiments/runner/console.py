"""What the suite prints, written for a log file as much as for a terminal.

Progress bars redraw in place: on a terminal that is a bar, in a file (``nohup``, SLURM, CI) it is
thousands of carriage-return lines per cell. So bars are drawn only when stdout and stderr are both
terminals; elsewhere each stage prints one line as it starts and one as it ends, with its seconds.
Third-party notices that tell this suite's user nothing they can act on are filtered where they
arise, each with the reason beside its filter; everything else (our warnings, Lightning's device
line, errors) still prints.
"""
from __future__ import annotations

import logging
import os
import warnings

from lightning_modules.terminal import on_terminal


def bars_off_the_terminal() -> None:
    """Off a terminal, switch off the progress bars of libraries that draw their own (tqdm in
    transformers, diffusers and the Hugging Face hub). Call before they are imported: both read their
    switch on import. A user's own setting of either variable wins."""
    if not on_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def one_line_warnings() -> None:
    """Print each warning as one line, ``file:line: Category: message``, without the source line that
    Python echoes under it (in a log that echo is a second line per warning saying nothing new)."""
    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"{filename}:{lineno}: {category.__name__}: {message}\n"

    warnings.formatwarning = one_line


class _DropMessages(logging.Filter):
    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(needle in message for needle in self.needles)


def quiet_third_party() -> None:
    """Install the filters below (the trainer builder calls this for every Trainer: a warnings filter
    added inside someone's ``warnings.catch_warnings()`` is gone when it exits, so they are re-added)."""
    # Lightning prints tips advertising its cloud logger and model registry every time a Trainer is
    # built; runs here log to MLflow and keep checkpoints in the stage folder, so each tip is an
    # advertisement, several times per cell.
    # Its "TPU available: False, using: 0 TPU cores" line, also per Trainer, is about hardware this suite
    # does not run on. (The GPU line stays: it says whether the run used one.)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages("litlogger", "litmodels", "TPU available:"))
    # Lightning's own pytree helper uses an API torch has deprecated; nothing a user of this suite can
    # change, and it repeats for every fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Lightning warns when any submodule is in eval mode at fit start. The trainer builder puts every
    # module with trainable weights in train mode before fit (experiments.runner.trainer.TrainMode); what stays
    # in eval mode is frozen on purpose (the diffusion model's VAE and text encoders), so the warning
    # only counts those.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
