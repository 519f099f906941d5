"""``meddiffaug grid GRID.yaml``: an ablation grid as data; every cell has a signature.

A cell is one (seed, variant, axis values) combination. Its signature hashes the variant name
and its resolved overrides, so a rerun finds the cells already FINISHED in MLflow (tags
``grid=<name>``, ``cell=<sig>``) and runs only the missing ones. Seeds are paired across methods:
seed ``s`` sets ``seed``, ``data.split_seed``, ``augment.seed`` and ``generation.seed`` (the
``seed_keys``), so every method sees the same split and the same few real images.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from experiments import pipeline, tracking
from experiments.config import ConfigError, load_config
from sweeps import space as sp

GRID_KEYS = {"name", "description", "base_config", "overrides", "axes", "variants", "seeds", "seed_keys", "tags"}
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

    @property
    def label(self) -> str:
        """A short human name: ``variant/key=value/seed0``."""
        parts = [self.variant] + [f"{k.split('.')[-1]}={v}" for k, v in self.axes.items()]
        return "/".join(parts + ([f"seed{self.seed}"] if self.seed is not None else []))

    def config(self) -> Any:
        """The resolved experiment config of this cell."""
        return load_config(self.base_config, self.overrides)


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


def grid_cells(grid_yaml: str | Path) -> List[Cell]:
    """Every cell of a grid YAML, seeds outermost (so partial results are already paired).

    Raises:
        ConfigError: unknown key in the grid file, an axis or seed key that is not a config key,
            or a cell whose overrides do not resolve (checked for every cell before any runs).
    """
    path = Path(grid_yaml)
    raw = sp.load_yaml(path, "Grid")
    sp.check_keys(raw, GRID_KEYS, str(path))
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
            load_config(base, shared + list(group))
        except ConfigError as err:
            raise ConfigError(f"grid '{name}' ({' '.join(group) or 'shared overrides'}): {err}") from err
    sigs = [c.sig for c in cells]
    if len(set(sigs)) != len(sigs):
        raise ConfigError(f"grid '{name}' has duplicate cells (same variant and overrides); check its axes.")
    return cells


def finished_cells(cells: Sequence[Cell]) -> Dict[str, str]:
    """Cell signature -> run id of its FINISHED MLflow run, for cells already done."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if not cells:
        return {}
    cfg = cells[0].config()
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cells[0].grid)
    if experiment is None:
        return {}
    done: Dict[str, str] = {}
    token = None
    while True:  # paginate: a grid can hold more cells than one page
        page = MlflowClient().search_runs([experiment.experiment_id], max_results=1000, page_token=token,
                                          filter_string=f"tags.grid = '{cells[0].grid}' and attributes.status = 'FINISHED'")
        done.update({r.data.tags["cell"]: r.info.run_id for r in page if "cell" in r.data.tags})
        token = page.token
        if not token:
            return done


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


def print_cells(cells: Sequence[Cell], done: Dict[str, str]) -> None:
    """One line per cell: status, signature, label, overrides."""
    for cell in cells:
        status = "done" if cell.sig in done else "todo"
        print(f"{status:4}  {cell.sig}  {cell.label:40}  {' '.join(cell.overrides)}")
    n_done = sum(c.sig in done for c in cells)
    print(f"{len(cells)} cells: {n_done} done, {len(cells) - n_done} todo")


def run_cells(cells: Sequence[Cell], rerun: bool = False) -> Dict[str, List[str]]:
    """Run every cell not yet FINISHED (every cell with ``rerun``); one failing cell does not stop the others.

    A rerun logs a new MLflow run per cell; tables keep each cell's latest finished run, and the old
    run stays in MLflow. Stages whose signature is unchanged come from the cache.

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...]}`` lists of cell signatures.
    """
    done = {} if rerun else finished_cells(cells)
    report: Dict[str, List[str]] = {"ran": [], "skipped": [], "failed": []}
    dm_key, datamodule = None, None
    for i, cell in enumerate(cells):
        if cell.sig in done:
            report["skipped"].append(cell.sig)
            continue
        cfg = cell.config()
        print(f"[grid] cell {i + 1}/{len(cells)} {cell.label} ({cell.sig})", flush=True)
        try:
            from omegaconf import OmegaConf

            key = sp.short_hash(OmegaConf.to_container(cfg.data, resolve=True))
            if key != dm_key:  # seeds are outermost: consecutive cells mostly share the data
                dm_key, datamodule = key, pipeline.build_datamodule(cfg)
            if getattr(datamodule, "extra_train", None) is not None:
                datamodule.extra_train = None  # the previous cell's synthetic pairs must not leak in
            pipeline.run_pipeline(cfg, run_name=cell.label, tags=cell.tags, experiment=cell.grid,
                                  datamodule=datamodule)
            report["ran"].append(cell.sig)
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - an unattended grid goes on; the cell stays "todo"
            traceback.print_exc()
            report["failed"].append(cell.sig)
    return report


def run_workers(argv: List[str], workers: int) -> int:
    """Run the grid in ``workers`` processes, one shard each, with the cores split between them.

    Shards share upstream stages through the stage cache's file locks, so a fine-tune that two
    shards need is computed once; each process gets ``cores // workers`` intra-op threads
    because small CPU models scale better across processes than across threads.
    """
    import os
    import subprocess

    base = [a for a in argv if not a.startswith("--workers")]
    if "--workers" in argv:  # drop "--workers N" given as two tokens
        i = argv.index("--workers")
        base = argv[:i] + argv[i + 2:]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.cli", "grid", *base, "--shard", f"{i}/{workers}"],
                              env=env) for i in range(workers)]
    return max(p.wait() for p in procs)


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug grid GRID.yaml [--dry-run] [--only KEY=VALUE ...] [--rerun] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="meddiffaug grid", description=main.__doc__)
    parser.add_argument("grid", help="grid YAML, e.g. sweeps/grids/diffaug_main.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list cells and their status; run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                        help="restrict to cells with this variant/seed/axis value (repeatable)")
    parser.add_argument("--workers", type=int, default=1,
                        help="run the cells in N processes on this machine (each takes every N-th cell)")
    parser.add_argument("--rerun", action="store_true",
                        help="run the selected cells even if finished (after a code change that bumped a "
                             "stage version); tables then use each cell's latest run")
    parser.add_argument("--shard", default=None, metavar="I/N", help="run only cells i, i+N, ... (used by --workers)")
    args = parser.parse_args(argv)
    cells = select(grid_cells(args.grid), args.only)
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        cells = list(cells)[index::count]
    elif args.workers > 1 and not args.dry_run:
        if cells:  # create the MLflow store once: concurrent first use races on its schema migration
            tracking.set_experiment(cells[0].config(), cells[0].grid)
        return run_workers(list(sys.argv[1:] if argv is None else argv), args.workers)
    if args.dry_run:
        print_cells(cells, finished_cells(cells))
        return 0
    report = run_cells(cells, rerun=args.rerun)
    print(f"[grid] ran {len(report['ran'])}, already done {len(report['skipped'])}, "
          f"failed {len(report['failed'])}: {' '.join(report['failed'])}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
