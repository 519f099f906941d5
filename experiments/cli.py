"""The experiment commands of ``meddiffaug`` (run, data, table, pretrain, ui) and their dispatcher.

Each subcommand is a ``main(argv=None)`` function so tests call it in-process. The console script
(:mod:`sweeps.cli`) adds the commands of the layer above (sweep, grid, demo, dashboard); this module
never names them, so imports only go down. ``python -m experiments.cli run ...`` is what a launcher
(torchrun, srun) starts on every rank.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from typing import Callable, Dict, List, Optional

from experiments.config import STAGES, ConfigError, load_config

USAGE = """usage: meddiffaug <command> [args]

commands:
  run CONFIG [key=value ...] [--stages S1,S2] [--force STAGE]   run an experiment (stage cache on)
  data inspect --dataset NAME --root DIR [--json]               check a dataset folder before training
  table TABLE.yaml [--write FILE.md] [--runs RECORDS]           paper tables from MLflow runs or run records
  pretrain [--out DIR] ...                                      pretrain the tiny diffusion base
  ui [--port 5000]                                              MLflow UI on 127.0.0.1

  meddiffaug --version                                          print the installed version
"""

DATA_USAGE = """usage: meddiffaug data <subcommand> [args]

subcommands:
  inspect --dataset NAME --root DIR [--json] [--image-size S] [--n-real N] [--split-file F]
          check a dataset folder (pairs, sizes, mask values, splits, lesions) before training;
          exits 1 when it finds a problem
  inspect --dataset procedural_<kind> [--center a|b] [--grid PNG] [--json]
          a procedural pool (center b: the second acquisition center) and its sample grid
"""


def _parse_stages(text: Optional[str]) -> Optional[List[str]]:
    if not text:
        return None
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"Unknown stage(s) {unknown} in --stages; choose from {', '.join(STAGES)}.")
    return stages


def run_main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug run CONFIG [key=value ...]``: run (or reuse) the experiment's stages."""
    parser = argparse.ArgumentParser(prog="meddiffaug run", description=run_main.__doc__)
    parser.add_argument("config", help="experiment YAML, e.g. experiments/configs/procedural_polyp_baseline.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_epochs=5")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", action="append", default=[], help="recompute this stage even if cached")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --stages
    cfg = load_config(args.config, args.overrides)  # before the heavy imports: a typo fails fast
    stages = _parse_stages(args.stages)
    _parse_stages(",".join(args.force))
    from experiments.runner.pipeline import run_pipeline
    from experiments.runner.preflight import preflight

    datamodule = preflight(cfg)  # config, environment and data faults stop here, before MLflow
    command = "meddiffaug run " + shlex.join(sys.argv[2:] if argv is None else argv)
    result = run_pipeline(cfg, targets=stages, force=args.force, datamodule=datamodule,
                          tags={"mlflow.note.content": f"Run by `{command}`."})  # the run's description
    from experiments.tracking import is_rank_zero

    if not is_rank_zero():  # under torchrun/srun every rank runs this command; rank 0 speaks for the run
        return 0
    print(json.dumps({"run_id": result.run_id, "sigs": result.sigs, "metrics": result.metrics}, indent=2))
    from experiments.runner.run_verdict import EXIT_NOT_A_RESULT, run_verdicts

    not_a_result, caveats = run_verdicts(cfg, result.metrics)
    for line in caveats:
        print(f"meddiffaug run: warning: {line}", file=sys.stderr)
    for line in not_a_result:
        print(f"meddiffaug run: not a result: {line}", file=sys.stderr)
    if not_a_result:
        recorded = f" (MLflow run {result.run_id})" if result.run_id else ""
        print(f"meddiffaug run: the run finished and is recorded{recorded}, but its numbers are not a result; "
              f"exit {EXIT_NOT_A_RESULT}.", file=sys.stderr)
        return EXIT_NOT_A_RESULT
    return 0


def _data_main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(DATA_USAGE)
        return 0
    if not argv or argv[0] != "inspect":
        unknown = f"meddiffaug data: unknown subcommand '{argv[0]}'.\n" if argv else ""
        print(f"{unknown}{DATA_USAGE}", file=sys.stderr)
        return 2
    from datamodules.inspect import main as inspect_main

    return inspect_main(argv[1:])


def lazy(target: str) -> Callable[[Optional[List[str]]], int]:
    def call(argv: Optional[List[str]] = None) -> int:
        module_name, func_name = target.split(":")
        return getattr(importlib.import_module(module_name), func_name)(argv)

    return call


COMMANDS: Dict[str, Callable[[Optional[List[str]]], int]] = {
    "run": run_main,
    "data": _data_main,
    "table": lazy("experiments.reporting.table_cli:main"),
    "pretrain": lazy("experiments.pretrain:main"),
    "ui": lazy("experiments.ui:ui_main"),
}


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``python -m experiments.cli <command> ...`` over the experiment commands."""
    return dispatch(argv, COMMANDS, USAGE)


def dispatch(argv: Optional[List[str]], commands: Dict[str, Callable[[Optional[List[str]]], int]],
             usage: str) -> int:
    """Run one of ``commands``; bad input exits 2 with a message, not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0 if argv else 2
    if argv[0] in {"-V", "--version"}:
        print(f"meddiffaug {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    from experiments.runner.console import bars_off_the_terminal, one_line_warnings

    bars_off_the_terminal()  # before any command imports tqdm or transformers
    one_line_warnings()
    if command not in commands:
        print(f"meddiffaug: unknown command '{command}'.\n{usage}", file=sys.stderr)
        return 2
    from datamodules.errors import DataError

    try:
        return int(commands[command](rest) or 0)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"meddiffaug {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an environment fault (permissions, disk full) on a named path
        if err.filename is None:
            raise
        print(f"meddiffaug {command}: error: {os_error_message(err)}", file=sys.stderr)
        return 2


def os_error_message(err: OSError) -> str:
    """One line naming the path an ``OSError`` is about and what to do."""
    import errno

    path = err.filename
    if isinstance(err, PermissionError):
        return (f"permission denied on {path}: make it readable/writable by you (chmod, or ask its "
                f"owner), or point the config key that names it at a folder you can use")
    if err.errno == errno.ENOSPC:
        return f"no space left on the device holding {path}: free space or write elsewhere"
    return f"cannot use {path} ({err.strerror or type(err).__name__}): check the path and its permissions"


def version() -> str:
    """The installed package version (from its metadata), or ``unknown`` in a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("meddiffaug")
    except PackageNotFoundError:
        return "unknown (not installed; run `pip install -e .`)"


if __name__ == "__main__":
    sys.exit(main())
