"""Running a grid's cells: in this process (``--rerun``), as a worker on the shared queue, or as N local workers.

A worker prints one line as each cell starts and one as it ends (with its duration), and the
pipeline one per stage (start, and done with seconds), so a log written to a file reads as a list
of what happened. On the queue a worker records the stage each cell is in (``--status`` shows it)
and shares its host's cores with the other workers there (:mod:`sweeps.cores`).
"""
from __future__ import annotations

import shlex
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from experiments import tracking
from experiments.runner import pipeline
from sweeps import space as sp


def description(cell: Any, command: str, grid_path: str) -> str:
    """A cell run's MLflow description (``mlflow.note.content``): its grid cell, the command that ran it
    and the command that runs it alone."""
    only = [f"variant={cell.variant}"] + [f"{k}={sp.format_value(v)}" for k, v in cell.axes.items()]
    only += [f"seed={cell.seed}"] if cell.seed is not None else []
    alone = shlex.join(["meddiffaug", "grid", grid_path, "--rerun"] + [a for o in only for a in ("--only", o)])
    return (f"Grid `{cell.grid}`, cell `{cell.label}` (`{cell.sig}`).\n\n"
            f"Run by `{command}`.\n\nThis cell alone: `{alone}`")


class CellRunner:
    """Runs cells one after another in this process, reusing the datamodule while the data is the same.

    Args:
        command: the command line that started this worker, for the runs' descriptions.
        grid_path: the grid YAML, for the command that runs one cell alone.
    """

    def __init__(self, command: str = "", grid_path: str = "GRID.yaml") -> None:
        self.dm_key, self.datamodule = None, None
        self.command, self.grid_path = command, grid_path

    def __call__(self, cell: Any, index: int, total: int,
                 on_stage: Optional[Callable[[str], None]] = None) -> Optional[float]:
        """Run one cell's pipeline; its final metric, or None when it failed (the traceback is printed)."""
        from omegaconf import OmegaConf

        cfg = cell.config()
        start = time.time()
        print(f"[grid] cell {index}/{total} {cell.label} ({cell.sig}) started", flush=True)
        try:
            key = sp.short_hash(OmegaConf.to_container(cfg.data, resolve=True))
            if key != self.dm_key:  # seeds are outermost: consecutive cells mostly share the data
                self.dm_key, self.datamodule = key, pipeline.build_datamodule(cfg)
            tags = {**cell.tags, "mlflow.note.content": description(cell, self.command, self.grid_path)}
            result = pipeline.run_pipeline(cfg, run_name=cell.label, tags=tags, experiment=cell.grid,
                                           datamodule=self.datamodule, on_stage=on_stage)
            from experiments.reporting.run_records import export_cell

            export_cell(cfg, cell.grid, cell.sig, cell.tags, result)  # the record that outlives this machine
            value = float(result.metrics.get(cell.identity()[2], 0.0))
            print(f"[grid] cell {index}/{total} {cell.label} done in {time.time() - start:.1f} s: "
                  f"{cell.identity()[2]}={value:.4f}", flush=True)
            return value
        except KeyboardInterrupt:
            raise
        except Exception:  # noqa: BLE001 - an unattended grid goes on; the cell stays "todo"
            traceback.print_exc()
            print(f"[grid] cell {index}/{total} {cell.label} failed after {time.time() - start:.1f} s "
                  f"(traceback above)", flush=True)
            return None


def close_killed_runs(cell: Any, experiment_id: Optional[str]) -> None:
    """The queue gave this worker the cell: any RUNNING run of it belongs to a dead worker; mark it KILLED."""
    from mlflow.tracking import MlflowClient

    if experiment_id is None:
        return
    client = MlflowClient()
    for run in client.search_runs([experiment_id], max_results=100, filter_string=(
            f"tags.grid = '{cell.grid}' and tags.cell = '{cell.sig}' and attributes.status = 'RUNNING'")):
        client.set_terminated(run.info.run_id, "KILLED")


def check_environment(cells: Sequence[Any]) -> None:
    """Stop before the first cell on faults every cell would hit: an output folder or MLflow store it
    cannot write, a diffusion base that is missing or damaged (``experiments.runner.preflight``; each distinct
    setting is checked once). Data faults differ per cell and end that cell as FAILED instead.

    Raises:
        ConfigError / FileNotFoundError: naming the key or file and what to do (``meddiffaug`` exits 2).
    """
    from experiments.runner.preflight import check_base, check_outputs

    seen = set()
    for cell in cells:
        cfg = cell.config()
        key = (cfg.artifacts_dir, cfg.output_dir, cfg.data.cache_dir, tracking.tracking_uri(cfg),
               cfg.tracking.artifact_root, cfg.diffusion.base_model, cfg.augment.method, cfg.validator.mode)
        if key not in seen:
            seen.add(key)
            check_outputs(cfg)
            check_base(cfg)


def run_cells(cells: Sequence[Any], done: Dict[str, str], runner: CellRunner) -> Dict[str, List[str]]:
    """Run the cells not in ``done`` in this process (no queue) with ``runner``.

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...]}`` lists of cell signatures.
    """
    report: Dict[str, List[str]] = {"ran": [], "skipped": [], "failed": []}
    for i, cell in enumerate(cells):
        if cell.sig in done:
            report["skipped"].append(cell.sig)
            continue
        report["ran" if runner(cell, i + 1, len(cells)) is not None else "failed"].append(cell.sig)
    return report


def run_queue(cells: Sequence[Any], done: Dict[str, str], storage: str, experiment: Callable[[], Optional[str]],
              runner: CellRunner, poll_s: float = 2.0, **queue_kwargs: Any) -> Dict[str, List[str]]:
    """Work on the grid's shared queue in ``storage`` until none of ``cells`` waits or runs anywhere.

    Cells not in ``done`` are enqueued (once, whatever the number of workers); this worker then
    claims and runs them one at a time. While other workers still run cells it waits, failing and
    re-queueing the cells of workers that died, so every cell ends done, failed or given up.

    Args:
        experiment: returns the grid's MLflow experiment id (None before its first run).
        runner: runs one cell (:class:`CellRunner`).

    Returns:
        ``{"ran": [...], "skipped": [...], "failed": [...]}``: what this worker did.
    """
    from sweeps.cores import CoreShare
    from sweeps.queue import CellQueue

    by_key = {cell.key(): cell for cell in cells}
    queue = CellQueue(storage, cells[0].grid, **queue_kwargs)
    queue.reap()
    queue.enqueue({cell.key(): {"cell": cell.sig, "label": cell.label} for cell in cells if cell.sig not in done})
    report: Dict[str, List[str]] = {"ran": [], "skipped": sorted(done), "failed": []}
    experiment_id = experiment()
    cores = CoreShare()
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
        close_killed_runs(cell, experiment_id)
        experiment_id = experiment_id or experiment()

        def on_stage(stage: str, claim=claim) -> None:
            queue.set_stage(claim, stage)
            cores.update(queue.workers_here())  # workers on this host may have come or gone

        cores.update(queue.workers_here())
        with queue.heartbeat(claim):
            value = runner(cell, len(report["ran"]) + len(report["failed"]) + 1, len(todo), on_stage)
        queue.finish(claim, value)
        report["ran" if value is not None else "failed"].append(cell.sig)


def run_workers(argv: List[str], workers: int) -> int:
    """Start ``workers`` local processes on the grid's queue.

    Workers share upstream stages through the stage cache's file locks, so a fine-tune that two
    cells need is computed once; each worker sets its threads from the workers of this host on the
    queue (:mod:`sweeps.cores`), because small CPU models scale better across processes than threads.

    Returns:
        0 when every worker exited 0; else 1 (a worker killed by a signal counts as a failure).
    """
    import subprocess

    base = [a for a in argv if not a.startswith("--workers")]
    if "--workers" in argv:  # drop "--workers N" given as two tokens
        i = argv.index("--workers")
        base = argv[:i] + argv[i + 2:]
    procs = [subprocess.Popen([sys.executable, "-m", "sweeps.cli", "grid", *base]) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    for i, code in enumerate(codes):
        if code < 0:
            print(f"[grid] worker {i} was killed by signal {-code}; its cell is re-queued for the next run",
                  file=sys.stderr, flush=True)
    return 0 if all(code == 0 for code in codes) else 1
