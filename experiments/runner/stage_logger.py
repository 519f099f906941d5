"""The Lightning logger of the pipeline's training stages (its own module: Lightning imports are slow,
and the class must be importable by name so DDP can pickle it into spawned processes)."""
from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class StageLogger(MLFlowLogger):
    """An ``MLFlowLogger`` that leaves the pipeline's run open when ``fit`` ends.

    The pipeline owns the run's status: :func:`experiments.tracking.start_run` ends it after the
    final stage's metrics are logged, so a kill between stages never leaves a "finished" run.
    """

    def finalize(self, status: str = "success") -> None:
        """Leave the run open (Lightning would end it here)."""
