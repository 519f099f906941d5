"""``meddiffaug grid GRID --status``: what every cell of a grid is doing, and how long the rest will take.

It reads the grid's queue (SQLite or PostgreSQL, :mod:`sweeps.queue`), the MLflow store and the
committed run records (``sweeps/records/``), and changes none of them. A cell is

- ``done``: a finished run (MLflow or the records) for its current signature, or a complete queue trial;
- ``running``: a live worker holds it (host, pid, the stage it is in, its last heartbeat);
- ``failed``: its worker died (its process is gone from this host, or no heartbeat for the grace
  period: the next worker that polls re-queues it), or the cell raised (the next
  ``meddiffaug grid GRID`` queues it again);
- ``retried``: waiting again after its worker died;
- ``waiting``: queued, not started; ``todo``: not queued yet (no worker has started on the grid).

The time left is the median duration of the finished cells of each variant (queue trials; the
records' stage times where the queue has none), times the cells left, over the live workers.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

STATES = ("done", "running", "waiting", "retried", "failed", "todo")


@dataclass
class CellState:
    """One cell's state, what it is doing, and its duration (done) or time so far (running)."""

    cell: Any
    state: str
    detail: str = ""
    seconds: Optional[float] = None
    worker: Optional[str] = None  # "host:pid" of a live worker running it


def queue_trials(url: str, grid: str) -> Dict[str, List[Any]]:
    """Queue key -> its Optuna trials, oldest first; empty when the grid has no queue in ``url``."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return {}  # never create a database just to look at it
    from sweeps.queue import rdb_storage

    storage = rdb_storage(url)
    try:
        study_id = storage.get_study_id_from_name(f"grid:{grid}")
    except KeyError:
        return {}
    trials: Dict[str, List[Any]] = {}
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        trials.setdefault(trial.user_attrs.get("key", ""), []).append(trial)
    return trials


def record_durations(grid: str) -> Dict[str, float]:
    """Cell signature -> the sum of its stage times in the grid's run records (cached stages included,
    so an upper bound: used only for cells the queue has no duration of)."""
    from experiments.reporting.run_records import read_records, records_path

    path = records_path(grid)
    if not path.is_file():
        return {}
    return {r["cell"]: sum(v for k, v in r["metrics"].items() if k.startswith("time/") and v is not None)
            for r in read_records([path]) if r.get("grid") == grid}


def _seconds(start: Optional[datetime], end: Optional[datetime]) -> Optional[float]:
    return (end - start).total_seconds() if start and end else None


def _worker(trial: Any) -> str:
    worker = trial.system_attrs.get("worker") or {}
    return f"{worker.get('host', '?')}:{worker.get('pid', '?')}"


def _why_dead(trial: Any, now: float, grace_period: float, host: str) -> Optional[str]:
    """Why a RUNNING trial's worker is dead, or None while it lives."""
    from sweeps.queue import pid_alive

    worker = trial.system_attrs.get("worker") or {}
    if worker.get("host") == host and not pid_alive(int(worker.get("pid", 0))):
        return "its process is gone"
    beat = trial.system_attrs.get("beat") or (trial.datetime_start.timestamp() if trial.datetime_start else now)
    if now - beat > grace_period:
        return f"no heartbeat for {format_duration(now - beat)}"
    return None


def cell_state(cell: Any, done: bool, trials: Sequence[Any], duration: Optional[float],
               grace_period: float, host: str, now: Optional[float] = None) -> CellState:
    """The state of one cell from whether it is done and its queue trials (see the module docstring)."""
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    by_state = {s: [t for t in trials if t.state == s] for s in (TrialState.RUNNING, TrialState.WAITING,
                                                                  TrialState.FAIL, TrialState.COMPLETE)}
    complete = by_state[TrialState.COMPLETE]
    if done or complete:
        return CellState(cell, "done", seconds=_seconds(complete[-1].datetime_start, complete[-1].datetime_complete)
                         if complete else duration)
    if by_state[TrialState.RUNNING]:
        trial = by_state[TrialState.RUNNING][0]
        elapsed = now - trial.datetime_start.timestamp() if trial.datetime_start else None
        dead = _why_dead(trial, now, grace_period, host)
        if dead:
            return CellState(cell, "failed", f"worker {_worker(trial)} died ({dead}); the next worker to poll "
                                             f"the queue re-queues it")
        beat = trial.system_attrs.get("beat")
        retry = len(trial.system_attrs.get("retry_history") or [])
        detail = (f"worker {_worker(trial)}, stage {trial.system_attrs.get('stage', 'starting')}"
                  + (f", heartbeat {format_duration(now - beat)} ago" if beat else "")
                  + (f", retry {retry}" if retry else ""))
        return CellState(cell, "running", detail, elapsed, worker=_worker(trial))
    if by_state[TrialState.WAITING]:
        history = by_state[TrialState.WAITING][0].system_attrs.get("retry_history") or []
        if history:
            lost = next((t for t in trials if t.number == history[-1]), None)
            by = f" of worker {_worker(lost)}" if lost is not None else ""
            return CellState(cell, "retried", f"re-queued (retry {len(history)}): trial {history[-1]}{by} died")
        return CellState(cell, "waiting", "queued")
    if by_state[TrialState.FAIL]:
        last = by_state[TrialState.FAIL][-1]
        return CellState(cell, "failed", f"failed in worker {_worker(last)} (its log says why); "
                                         f"the next `meddiffaug grid` queues it again")
    return CellState(cell, "todo", "not queued")


def grid_states(cells: Sequence[Any], done: Mapping[str, str], storage: str, grace_period: float) -> List[CellState]:
    """Every cell's state: ``done`` from :func:`sweeps.finished.finished_cells`, the rest from the queue."""
    import socket

    if not cells:
        return []
    trials = queue_trials(storage, cells[0].grid)
    records = record_durations(cells[0].grid)
    host, now = socket.gethostname(), time.time()
    return [cell_state(c, c.sig in done, trials.get(c.key(), []), records.get(c.sig), grace_period, host, now)
            for c in cells]


def time_left(states: Sequence[CellState]) -> Optional[tuple]:
    """``(seconds, workers, finished cells it is based on)``, or None before any cell has a duration.

    A cell left takes the median duration of the finished cells of its variant (of all finished
    cells where its variant has none); a running cell the rest of that; the work is shared by the
    live workers (one when none runs).
    """
    finished = [s for s in states if s.state == "done" and s.seconds is not None]
    if not finished:
        return None
    overall = statistics.median(s.seconds for s in finished)
    by_variant: Dict[str, List[float]] = {}
    for s in finished:
        by_variant.setdefault(s.cell.variant, []).append(s.seconds)
    work = 0.0
    for s in states:
        if s.state == "done":
            continue
        expected = statistics.median(by_variant[s.cell.variant]) if s.cell.variant in by_variant else overall
        work += max(0.0, expected - (s.seconds or 0.0)) if s.state == "running" else expected
    workers = max(1, len({s.worker for s in states if s.worker}))
    return work / workers, workers, len(finished)


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def summary(grid: str, states: Sequence[CellState]) -> str:
    """One line: the count of cells in each state and the time left."""
    counts = ", ".join(f"{sum(s.state == name for s in states)} {name}" for name in STATES)
    left = time_left(states)
    if not any(s.state != "done" for s in states):
        eta = "nothing left"
    elif left is None:
        eta = "time left unknown until a cell finishes"
    else:
        eta = (f"about {format_duration(left[0])} left at {left[1]} worker{'s' * (left[1] > 1)} "
               f"(median of {left[2]} finished cells)")
    return f"grid {grid}: {len(states)} cells: {counts}; {eta}"


def print_states(grid: str, states: Sequence[CellState], overrides: bool = False) -> None:
    """One line per cell (state, signature, label, what it is doing; its overrides with ``overrides``),
    then the summary."""
    for s in states:
        took = "" if s.seconds is None else format_duration(s.seconds) + (" so far" if s.state != "done" else "")
        text = " ".join(s.cell.overrides) if overrides else "; ".join(x for x in (s.detail, took) if x)
        print(f"{s.state:8} {s.cell.sig}  {s.cell.label:40}  {text}")
    print(summary(grid, states), flush=True)
