"""``meddiffaug grid GRID.yaml``: an ablation grid as data; every cell has a signature.

A cell is one (seed, variant, axis values) combination. Its signature hashes the variant name
and its resolved overrides (MLflow tags ``grid=<name>``, ``cell=<sig>``); a cell is done when
MLflow holds a FINISHED run of it for its current final-stage signature (tag ``sig``) with the
final stage's metric (``test/dice``), so a rerun runs only the missing cells. Workers on any
number of machines take cells from one queue in a shared database (:mod:`sweeps.queue`), each
cell once; a cell whose worker died is re-queued (:mod:`sweeps.worker` runs them, ``--status``
shows each cell's state: :mod:`sweeps.status`). Seeds are paired across methods:
seed ``s`` sets ``seed``, ``data.split_seed``, ``augment.seed`` and ``generation.seed`` (the
``seed_keys``), so every method sees the same split and the same few real images.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from experiments import tracking
from experiments.runner import pipeline
from experiments.config import ConfigError, load_config
from sweeps import space as sp
from sweeps.finished import default_storage, finished_cells, mlflow_experiment

GRID_KEYS = {"name", "description", "extends", "base_config", "overrides", "axes", "variants", "seeds", "seed_keys", "tags"}
DEFAULT_SEED_KEYS = ["seed", "data.split_seed", "augment.seed", "generation.seed"]


@dataclass
class Cell:
    """One run of a grid."""

    grid: str
    variant: str
    axes: Dict[str, Any]
    seed: Optional[int]
    overrides: List[str]
    base_config: Path
    sig: str = ""
    tags: Dict[str, str] = field(default_factory=dict)
    _identity: Optional[Tuple[str, str, str]] = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        """A short human name: ``variant/key=value/seed0``."""
        parts = [self.variant] + [f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()]
        return "/".join(parts + ([f"seed{self.seed}"] if self.seed is not None else []))

    def config(self) -> Any:
        """The resolved experiment config of this cell."""
        return load_config(self.base_config, self.overrides)

    def identity(self) -> Tuple[str, str, str]:
        """``(final stage, its signature, the metric that proves it done)``.

        The signature is the run's ``sig`` tag: a base-YAML edit or a stage-version bump changes it,
        and the cell is then not done any more.
        """
        if self._identity is None:
            cfg = self.config()
            stage = pipeline.required_stages(cfg)[-1]
            metric = "test/dice" if stage == "segment" else f"time/{stage}_s"
            self._identity = (stage, pipeline.signatures(cfg)[stage], metric)
        return self._identity

    def key(self) -> str:
        """The cell's name in the shared queue: its grid signature and its final stage signature."""
        return f"{self.sig}-{self.identity()[1]}"


def _as_list(value: Any, what: str, source: str) -> List[Any]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{what} in {source} must be a non-empty list.")
    return value


def _variant_plan(name: Any, spec: Any, axes: Dict[str, List[Any]], source: str) -> tuple:
    """A variant is a dotlist, or ``{overrides: [...], axes: {key: [...]}}`` whose axes replace the
    grid's for that variant (e.g. ablations run on one architecture only)."""
    if spec is None or isinstance(spec, list):
        return sp.as_overrides(spec, f"variant '{name}' of {source}"), axes
    if not isinstance(spec, dict):
        raise ConfigError(f"variant '{name}' in {source} must be a list of overrides or a mapping.")
    sp.check_keys(spec, {"overrides", "axes"}, f"variant '{name}' of {source}")
    own = dict(axes)
    for key, values in (spec.get("axes") or {}).items():
        sp.check_config_key(key, f"axes of variant '{name}' in {source}")
        own[key] = _as_list(values, f"axis '{key}' of variant '{name}'", source)
    return sp.as_overrides(spec.get("overrides"), f"variant '{name}' of {source}"), own


def extended(raw: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """A grid with ``extends: <grid.yaml>`` is that grid with its own keys on top: its ``overrides`` are
    appended (a later override of a key wins), its ``tags`` merged, any other key replaces the base's.

    A cell's signature hashes its variant and final overrides, so a grid split into a base and a
    few lines per modality keeps the cells (and their records) of the file it replaces.
    """
    sp.check_keys(raw, GRID_KEYS, str(path))
    if "extends" not in raw:
        return raw
    base_path = sp.resolve_path(str(raw["extends"]), path.parent)
    base = extended(sp.load_yaml(base_path, "Grid"), base_path)
    merged = {**base, **{k: v for k, v in raw.items() if k != "extends"}}
    merged["overrides"] = (sp.as_overrides(base.get("overrides"), str(base_path))
                           + sp.as_overrides(raw.get("overrides"), str(path)))
    merged["tags"] = {**(base.get("tags") or {}), **(raw.get("tags") or {})}
    return merged


def grid_cells(grid_yaml: str | Path) -> List[Cell]:
    """Every cell of a grid YAML, seeds outermost (so partial results are already paired).

    Raises:
        ConfigError: unknown key in the grid file, an axis or seed key that is not a config key,
            or a cell whose overrides do not resolve (checked for every cell before any runs).
    """
    path = Path(grid_yaml)
    raw = extended(sp.load_yaml(path, "Grid"), path)
    for required in ("name", "base_config"):
        if required not in raw:
            raise ConfigError(f"'{required}' is missing in {path}.")
    name, base = str(raw["name"]), sp.resolve_path(raw["base_config"], path.parent)
    shared = sp.as_overrides(raw.get("overrides"), str(path))
    axes = raw.get("axes") or {}
    for key, values in axes.items():
        sp.check_config_key(key, f"axes of {path}")
        _as_list(values, f"axis '{key}'", str(path))
    variants = raw.get("variants") or {"default": []}
    if not isinstance(variants, dict):
        raise ConfigError(f"'variants' in {path} must map a name to a list of overrides.")
    seeds = _as_list(raw["seeds"], "'seeds'", str(path)) if "seeds" in raw else [None]
    if any(s is not None and (isinstance(s, bool) or not isinstance(s, int)) for s in seeds):
        raise ConfigError(f"'seeds' in {path} must be a list of integers.")
    seed_keys = list(raw.get("seed_keys") or DEFAULT_SEED_KEYS)
    for key in seed_keys:
        sp.check_config_key(key, f"seed_keys of {path}")
    extra_tags = {str(k): str(v) for k, v in (raw.get("tags") or {}).items()}
    plans = [(str(variant), *_variant_plan(variant, spec, axes, str(path))) for variant, spec in variants.items()]
    cells = []
    for seed, (variant, dotlist, own_axes) in itertools.product(seeds, plans):
        for values in itertools.product(*own_axes.values()):
            point = dict(zip(own_axes.keys(), values))
            seeded = sp.to_overrides({k: int(seed) for k in seed_keys}) if seed is not None else []
            overrides = shared + dotlist + sp.to_overrides(point) + seeded
            sig = sp.short_hash({"variant": variant, "overrides": sp.overrides_dict(overrides)})
            tags = {**extra_tags, "grid": name, "cell": sig, "variant": variant,
                    **{f"axis.{k}": sp.format_value(v) for k, v in point.items()}}
            if seed is not None:
                tags["seed"] = str(seed)
            cells.append(Cell(name, variant, point, seed, overrides, base, sig, tags))
    # A typo in one cell must fail now, not after hours of the others. Overrides act key by key,
    # so checking each variant, axis value and seed block once covers every cell, cheaply.
    groups = {tuple(dotlist) for _, dotlist, _ in plans}
    groups |= {(f"{key}={sp.format_value(v)}",) for _, _, own in plans for key, values in own.items() for v in values}
    groups |= {tuple(sp.to_overrides({k: int(s) for k in seed_keys})) for s in seeds if s is not None}
    for group in sorted(groups):
        try:
            load_config(base, shared + list(group), overrides_source=f"grid file '{path}'")
        except ConfigError as err:
            raise ConfigError(f"grid '{name}' ({' '.join(group) or 'shared overrides'}): {err}") from err
    sigs = [c.sig for c in cells]
    if len(set(sigs)) != len(sigs):
        raise ConfigError(f"grid '{name}' has duplicate cells (same variant and overrides); check its axes.")
    return cells


def select(cells: Sequence[Cell], only: Sequence[str]) -> List[Cell]:
    """Keep cells matching every ``KEY=VALUE`` (KEY: ``variant``, ``seed`` or an axis key);
    repeating a key allows any of its values."""
    wanted: Dict[str, set] = {}
    for item in only:
        if "=" not in item:
            raise ConfigError(f"--only '{item}' is not of the form KEY=VALUE (e.g. variant=copy_paste).")
        key, value = item.split("=", 1)
        wanted.setdefault(key.strip(), set()).add(value.strip())
    known = {"variant", "seed"} | {k for c in cells for k in c.axes}
    sp.check_keys(wanted, known, "--only")

    def value_of(cell: Cell, key: str) -> str:
        if key == "variant":
            return cell.variant
        if key == "seed":
            return str(cell.seed)
        return sp.format_value(cell.axes.get(key))

    def same(a: str, b: str) -> bool:  # "0.5" == "0.50", "3" == "3.0"
        try:
            return float(a) == float(b)
        except ValueError:
            return a == b

    return [c for c in cells if all(any(same(value_of(c, k), v) for v in vs) for k, vs in wanted.items())]


def _states(cells: Sequence[Cell], storage: Optional[str], grace_period: Optional[int]) -> List[Any]:
    from sweeps.queue import GRACE_PERIOD
    from sweeps.status import grid_states

    url = storage or default_storage(cells[0].config())
    return grid_states(cells, finished_cells(cells), url, grace_period or GRACE_PERIOD)


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug grid GRID.yaml [--status | --dry-run] [--only KEY=VALUE ...] [--rerun] [--workers N] [--storage URL]``."""
    parser = argparse.ArgumentParser(prog="meddiffaug grid", description=main.__doc__)
    parser.add_argument("grid", nargs="+", help="grid YAML, e.g. sweeps/grids/diffaug_main.yaml "
                                                "(several with --status or --dry-run)")
    parser.add_argument("--status", action="store_true",
                        help="each cell's state (done, running: worker, stage, heartbeat; waiting, retried, "
                             "failed, todo), a summary line per grid and the time left; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="the --status states with each cell's overrides")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="restrict to cells with this variant/seed/axis value (repeatable)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="SQLAlchemy URL of the shared cell queue, e.g. postgresql://user:pw@host/db; "
                             "every worker on every machine given the same URL shares the cells "
                             "(default: optuna.db beside the SQLite MLflow store)")
    parser.add_argument("--workers", type=int, default=1, help="start N local workers on the queue")
    parser.add_argument("--rerun", action="store_true",
                        help="run the selected cells in this process even if done (no queue); tables then "
                             "use each cell's latest run")
    parser.add_argument("--heartbeat-interval", type=int, default=None, help="seconds between heartbeats (20)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="seconds without a heartbeat after which a cell's worker counts as dead (120)")
    args = parser.parse_args(argv)
    if args.status or args.dry_run:
        from sweeps.status import print_states

        for path in args.grid:
            cells = select(grid_cells(path), args.only)
            states = _states(cells, args.storage, args.grace_period) if cells else []
            print_states(cells[0].grid if cells else str(path), states, overrides=args.dry_run)
        return 0
    if len(args.grid) > 1:
        raise ConfigError(f"give one grid to run (got {len(args.grid)}); --status and --dry-run take several.")
    cells = select(grid_cells(args.grid[0]), args.only)
    if not cells:
        print("[grid] no cell selected", flush=True)
        return 0
    from sweeps import worker

    worker.check_environment(cells)
    runner = worker.CellRunner("meddiffaug grid " + shlex.join(sys.argv[1:] if argv is None else argv), args.grid[0])
    if args.rerun:
        report = worker.run_cells(cells, {}, runner)
    else:
        cfg = cells[0].config()
        storage = args.storage or default_storage(cfg)
        if args.workers > 1:
            from sweeps.queue import CellQueue

            tracking.set_experiment(cfg, cells[0].grid)  # create both stores once: first use races on
            CellQueue(storage, cells[0].grid)  # their schema migrations
            return worker.run_workers(list(sys.argv[1:] if argv is None else argv), args.workers)
        kwargs = {k: v for k, v in (("heartbeat_interval", args.heartbeat_interval),
                                    ("grace_period", args.grace_period)) if v is not None}
        report = worker.run_queue(cells, finished_cells(cells), storage, lambda: mlflow_experiment(cells), runner,
                                  **kwargs)
    print(f"[grid] ran {len(report['ran'])}, already done {len(report['skipped'])}, "
          f"failed {len(report['failed'])}: {' '.join(report['failed'])}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
