"""``meddiffaug grid GRID.yaml``: an ablation grid as data; every cell has a signature.

A cell is one (seed, variant, axis values) combination. Its signature hashes the variant name
and its resolved overrides (MLflow tags ``grid=<name>``, ``cell=<sig>``); a cell is done when
MLflow holds a FINISHED run of it for its current final-stage signature (tag ``sig``) with the
final stage's metric (``test/dice``), so a rerun runs only the missing cells. Workers on any
number of machines take cells from one queue in a shared database (:mod:`sweeps.queue`), each
cell once; a cell whose worker died is re-queued. Seeds are paired across methods:
seed ``s`` sets ``seed``, ``data.split_seed``, ``augment.seed`` and ``generation.seed`` (the
``seed_keys``), so every method sees the same split and the same few real images.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
            load_config(base, shared + list(group), overrides_source=f"grid file '{path}'")
        except ConfigError as err:
            raise ConfigError(f"grid '{name}' ({' '.join(group) or 'shared overrides'}): {err}") from err
    sigs = [c.sig for c in cells]
    if len(set(sigs)) != len(sigs):
        raise ConfigError(f"grid '{name}' has duplicate cells (same variant and overrides); check its axes.")
    return cells


def default_storage(cfg: Any) -> str:
    """The queue's default storage: ``optuna.db`` beside a SQLite MLflow store, else under ``output_dir``."""
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path(cfg.output_dir) / 'optuna.db'}"


def _mlflow_experiment(cells: Sequence[Cell]) -> Optional[str]:
    import mlflow

    uri = tracking.tracking_uri(cells[0].config())
    tracking.require_server(uri, tracking.uri_source())  # fail in seconds, not after MLflow's retries
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cells[0].grid)
    return None if experiment is None else experiment.experiment_id


def finished_cells(cells: Sequence[Cell]) -> Dict[str, str]:
    """Cell signature -> run id of its done MLflow run, for cells already done.

    Done means FINISHED, logged for the cell's current final-stage signature (a base-YAML edit or a
    stage-version bump makes a cell not done) and holding the final stage's metric: a run's status
    alone is a claim (a killed run's logger may have ended it), the final metric is the fact.
    """
    from mlflow.tracking import MlflowClient

    if not cells:
        return {}
    from experiments.reporting.run_records import exported_cells

    wanted = {c.sig: c.identity() for c in cells}
    # Cells in the committed run records are done on any machine (the MLflow store is not committed).
    done: Dict[str, str] = exported_cells(cells[0].grid, wanted)
    experiment_id = _mlflow_experiment(cells)
    if experiment_id is None:
        return done
    token = None
    while True:  # paginate: a grid can hold more cells than one page
        page = MlflowClient().search_runs([experiment_id], max_results=1000, page_token=token,
                                          filter_string=f"tags.grid = '{cells[0].grid}' and attributes.status = 'FINISHED'")
        for run in page:
            cell = run.data.tags.get("cell")
            if cell in wanted and run.data.tags.get("sig") == wanted[cell][1] and wanted[cell][2] in run.data.metrics:
                done[cell] = run.info.run_id
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


class _CellRunner:
    """Runs cells one after another in this process, reusing the datamodule while the data is the same."""

    def __init__(self) -> None:
        self.dm_key, self.datamodule = None, None

    def __call__(self, cell: Cell, index: int, total: int) -> Optional[float]:
        """Run one cell's pipeline; its final metric, or None when it failed (the traceback is printed)."""
        from omegaconf import OmegaConf

        cfg = cell.config()
        print(f"[grid] cell {index}/{total} {cell.label} ({cell.sig})", flush=True)
        try:
            key = sp.short_hash(OmegaConf.to_container(cfg.data, resolve=True))
            if key != self.dm_key:  # seeds are outermost: consecutive cells mostly share the data
                self.dm_key, self.datamodule = key, pipeline.build_datamodule(cfg)
            result = pipeline.run_pipeline(cfg, run_name=cell.label, tags=cell.tags, experiment=cell.grid,
                                           datamodule=self.datamodule)
            from experiments.reporting.run_records import export_cell

            export_cell(cfg, cell.grid, cell.sig, cell.tags, result)  # the record that outlives this machine
            return float(result.metrics.get(cell.identity()[2], 0.0))
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - an unattended grid goes on; the cell stays "todo"
            traceback.print_exc()
            return None


def _close_killed_runs(cell: Cell, experiment_id: Optional[str]) -> None:
    """The queue gave this worker the cell: any RUNNING run of it belongs to a dead worker; mark it KILLED."""
    from mlflow.tracking import MlflowClient

    if experiment_id is None:
        return
    client = MlflowClient()
    for run in client.search_runs([experiment_id], max_results=100, filter_string=(
            f"tags.grid = '{cell.grid}' and tags.cell = '{cell.sig}' and attributes.status = 'RUNNING'")):
        client.set_terminated(run.info.run_id, "KILLED")


def run_cells(cells: Sequence[Cell], rerun: bool = False) -> Dict[str, List[str]]:
    """Run the selected cells in this process, every one of them with ``rerun`` (no queue).

    A rerun logs a new MLflow run per cell; tables keep each cell's latest finished run, and the old
    run stays in MLflow. Stages whose signature is unchanged come from the cache.

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...]}`` lists of cell signatures.
    """
    done = {} if rerun else finished_cells(cells)
    report: Dict[str, List[str]] = {"ran": [], "skipped": [], "failed": []}
    runner = _CellRunner()
    for i, cell in enumerate(cells):
        if cell.sig in done:
            report["skipped"].append(cell.sig)
            continue
        report["ran" if runner(cell, i + 1, len(cells)) is not None else "failed"].append(cell.sig)
    return report


def run_queue(cells: Sequence[Cell], storage: str, poll_s: float = 2.0, **queue_kwargs: Any) -> Dict[str, List[str]]:
    """Work on the grid's shared queue in ``storage`` until none of ``cells`` waits or runs anywhere.

    Cells not done in MLflow are enqueued (once, whatever the number of workers); this worker then
    claims and runs them one at a time. While other workers still run cells it waits, failing and
    re-queueing the cells of workers that died, so every cell ends done, failed or given up.

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...]}``: what this worker did.
    """
    from sweeps.queue import CellQueue

    done = finished_cells(cells)
    by_key = {cell.key(): cell for cell in cells}
    queue = CellQueue(storage, cells[0].grid, **queue_kwargs)
    queue.reap()
    queue.enqueue({cell.key(): {"cell": cell.sig, "label": cell.label} for cell in cells if cell.sig not in done})
    report: Dict[str, List[str]] = {"ran": [], "skipped": sorted(done), "failed": []}
    experiment_id = _mlflow_experiment(cells)
    runner = _CellRunner()
    todo = set(by_key) - {c.key() for c in cells if c.sig in done}
    while True:
        claim = queue.claim(todo)
        if claim is None:
            if not queue.pending(todo):
                return report
            time.sleep(poll_s)
            queue.reap()
            continue
        cell = by_key[claim.key]
        _close_killed_runs(cell, experiment_id)
        experiment_id = experiment_id or _mlflow_experiment(cells)
        with queue.heartbeat(claim):
            value = runner(cell, len(report["ran"]) + len(report["failed"]) + 1, len(todo))
        queue.finish(claim, value)
        report["ran" if value is not None else "failed"].append(cell.sig)


def run_workers(argv: List[str], workers: int) -> int:
    """Start ``workers`` local processes on the grid's queue, with the cores split between them.

    Workers share upstream stages through the stage cache's file locks, so a fine-tune that two
    cells need is computed once; each process gets ``cores // workers`` intra-op threads because
    small CPU models scale better across processes than across threads.

    Returns:
        0 when every worker exited 0; else 1 (a worker killed by a signal counts as a failure).
    """
    import os
    import subprocess

    base = [a for a in argv if not a.startswith("--workers")]
    if "--workers" in argv:  # drop "--workers N" given as two tokens
        i = argv.index("--workers")
        base = argv[:i] + argv[i + 2:]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.cli", "grid", *base], env=env) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    for i, code in enumerate(codes):
        if code < 0:
            print(f"[grid] worker {i} was killed by signal {-code}; its cell is re-queued for the next run",
                  file=sys.stderr, flush=True)
    return 0 if all(code == 0 for code in codes) else 1


def check_environment(cells: Sequence[Cell]) -> None:
    """Stop before the first cell on faults every cell would hit: an output folder or MLflow store it
    cannot write, a diffusion base that is missing or damaged (``experiments.preflight``; each distinct
    setting is checked once). Data faults differ per cell and end that cell as FAILED instead.

    Raises:
        ConfigError / FileNotFoundError: naming the key or file and what to do (``meddiffaug`` exits 2).
    """
    from experiments.preflight import check_base, check_outputs

    seen = set()
    for cell in cells:
        cfg = cell.config()
        key = (cfg.artifacts_dir, cfg.output_dir, cfg.data.cache_dir, tracking.tracking_uri(cfg),
               cfg.tracking.artifact_root, cfg.diffusion.base_model, cfg.augment.method, cfg.validator.mode)
        if key not in seen:
            seen.add(key)
            check_outputs(cfg)
            check_base(cfg)


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug grid GRID.yaml [--dry-run] [--only KEY=VALUE ...] [--rerun] [--workers N] [--storage URL]``."""
    parser = argparse.ArgumentParser(prog="meddiffaug grid", description=main.__doc__)
    parser.add_argument("grid", help="grid YAML, e.g. sweeps/grids/diffaug_main.yaml")
    parser.add_argument("--dry-run", action="store_true", help="list cells and their status; run nothing")
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
    cells = select(grid_cells(args.grid), args.only)
    if args.dry_run:
        print_cells(cells, finished_cells(cells))
        return 0
    if not cells:
        print("[grid] no cell selected", flush=True)
        return 0
    check_environment(cells)
    if args.rerun:
        report = run_cells(cells, rerun=True)
    else:
        cfg = cells[0].config()
        storage = args.storage or default_storage(cfg)
        if args.workers > 1:
            from sweeps.queue import CellQueue

            tracking.set_experiment(cfg, cells[0].grid)  # create both stores once: first use races on
            CellQueue(storage, cells[0].grid)  # their schema migrations
            return run_workers(list(sys.argv[1:] if argv is None else argv), args.workers)
        kwargs = {k: v for k, v in (("heartbeat_interval", args.heartbeat_interval),
                                    ("grace_period", args.grace_period)) if v is not None}
        report = run_queue(cells, storage, **kwargs)
    print(f"[grid] ran {len(report['ran'])}, already done {len(report['skipped'])}, "
          f"failed {len(report['failed'])}: {' '.join(report['failed'])}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
