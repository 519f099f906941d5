"""``meddiffaug``: the console script, one subcommand per job.

The experiment commands (:mod:`experiments.cli`: run, data, table, pretrain, ui) and the commands
of this layer: Optuna studies, grids, the demo and the study dashboard. Each is a
``main(argv=None)`` function so tests call it in-process.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from experiments import cli as experiment_cli

USAGE = """usage: meddiffaug <command> [args]

commands:
  run CONFIG [key=value ...] [--stages S1,S2] [--force STAGE]   run an experiment (stage cache on)
  data inspect --dataset NAME --root DIR [--json]               check a dataset folder before training
  sweep STUDY.yaml [--n-trials N] [--storage URL]               Optuna study logged to MLflow
  grid GRID.yaml [--dry-run]                                    ablation grid; reruns only missing cells
  grid GRID.yaml --status                                       each cell's state, workers, time left
  table TABLE.yaml [--write FILE.md] [--runs RECORDS]           paper tables from MLflow runs or run records
  pretrain [--out DIR] ...                                      pretrain the tiny diffusion base
  demo                                                          the main job on procedural data
  ui [--port 5000]                                              MLflow UI on 127.0.0.1
  dashboard [STORAGE_URL] [--port 8080]                         optuna-dashboard on 127.0.0.1

  meddiffaug --version                                          print the installed version
"""


def defined_cell_ids(grid: str) -> Optional[Sequence[str]]:
    """The cell ids ``sweeps/grids/<grid>.yaml`` (from the working directory, as the table specs name
    grids) defines; None when there is no such file, it names another grid, or it no longer loads."""
    from experiments.config import ConfigError
    from sweeps.grid import grid_cells

    path = Path("sweeps") / "grids" / f"{grid}.yaml"
    if not path.is_file():
        return None
    try:
        cells = grid_cells(path)
    except ConfigError as err:  # an old grid whose keys have gone: its table still builds, without the count
        print(f"[table] {path} does not load ({err}); the table cannot say whether grid '{grid}' has finished",
              file=sys.stderr)
        return None
    return [c.sig for c in cells] if cells and cells[0].grid == grid else None


def table_main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug table``, told which cells each grid defines so an interim table says it is one."""
    from experiments.reporting.table_cli import main as table

    return table(argv, defined_cells=defined_cell_ids)


COMMANDS: Dict[str, Callable[[Optional[List[str]]], int]] = {
    **experiment_cli.COMMANDS,
    "table": table_main,
    "sweep": experiment_cli.lazy("sweeps.study:main"),
    "grid": experiment_cli.lazy("sweeps.grid:main"),
    "demo": experiment_cli.lazy("sweeps.demo:main"),
    "dashboard": experiment_cli.lazy("sweeps.dashboard:main"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``meddiffaug <command> ...``."""
    return experiment_cli.dispatch(argv, COMMANDS, USAGE)


if __name__ == "__main__":
    sys.exit(main())
