"""A shared queue of grid cells kept in an Optuna RDB storage: one study per grid, one trial per cell run.

Every worker (on any machine) pointed at the same storage URL (PostgreSQL, or SQLite on one machine)
enqueues the cells that are not done yet as WAITING trials and then claims them one at a time.
Claiming moves a trial WAITING -> RUNNING, which Optuna's RDB storage does atomically on PostgreSQL
(``SELECT ... FOR UPDATE``); on SQLite a file lock next to the database serialises claims. Two
workers starting together may enqueue the same cell twice: a claimed trial is dropped (PRUNED,
``duplicate_of``) when its cell is already complete or held by a lower-numbered trial, so each
cell runs once. While a cell runs its worker records a heartbeat; a trial whose worker died (no
heartbeat for ``grace_period`` s, or a dead process on this host) is failed and re-queued by
Optuna's heartbeat-stale retry callback, so the surviving workers run it. A running trial also
holds its worker (host, pid), the time of its last heartbeat and the stage its cell is in, which
``meddiffaug grid --status`` reads (:mod:`sweeps.status`).
"""
from __future__ import annotations

import contextlib
import fcntl
import inspect
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

HEARTBEAT_INTERVAL = 20  # seconds between a running cell's heartbeats
GRACE_PERIOD = 120  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
MAX_RETRY = 3  # re-queues of one cell whose workers died (a cell that raises is not retried)


def rdb_storage(url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD,
                max_retry: int = MAX_RETRY) -> Any:
    """Optuna RDB storage with heartbeat and automatic re-queueing of trials whose worker died."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # optuna < 4.9 names it so
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeat is "experimental" in optuna: not the user's concern
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period, **{arg: retry_cls(max_retry=max_retry)})
        except ImportError as err:  # optuna wraps the missing SQLAlchemy driver this way
            raise ImportError(f"storage {url.split('@')[-1]!r}: the database driver is not installed ({err.__cause__ or err}). "
                              "For postgresql:// run: pip install -e '.[postgres]' (psycopg 3)") from err
        except Exception as err:  # noqa: BLE001 - workers starting together on an empty database race to
            if attempt == 4 or "duplicate" not in str(err).lower():  # create its tables; the losers retry
                raise
            time.sleep(1.0 + attempt)


@dataclass
class Claim:
    """A cell this worker holds: its queue key and the Optuna trial that stands for it."""

    key: str
    number: int
    trial_id: int


class CellQueue:
    """The queue of one grid in one storage.

    Args:
        url: SQLAlchemy URL, e.g. ``postgresql://user@host/db`` or ``sqlite:///outputs/optuna.db``.
        grid: grid name; the study is ``grid:<name>``.
        heartbeat_interval, grace_period, max_retry: see the module constants.
    """

    def __init__(self, url: str, grid: str, heartbeat_interval: int = HEARTBEAT_INTERVAL,
                 grace_period: int = GRACE_PERIOD, max_retry: int = MAX_RETRY):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = url
        self.storage = rdb_storage(url, heartbeat_interval, grace_period, max_retry)
        self.heartbeat_interval = heartbeat_interval
        self.study = optuna.create_study(study_name=f"grid:{grid}", storage=self.storage, load_if_exists=True)
        self.study_id = self.storage.get_study_id_from_name(f"grid:{grid}")
        self.worker = {"host": socket.gethostname(), "pid": os.getpid()}

    # ------------------------------------------------------------------ state
    def _trials(self, states: Optional[Iterable[Any]] = None) -> List[Any]:
        states = tuple(states) if states is not None else None
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def _held(self) -> Dict[str, List[Any]]:
        """Queue key -> its WAITING, RUNNING or COMPLETE trials."""
        from optuna.trial import TrialState

        held: Dict[str, List[Any]] = {}
        for trial in self._trials((TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)):
            held.setdefault(trial.user_attrs.get("key", ""), []).append(trial)
        return held

    def completed(self) -> Dict[str, int]:
        """Queue key -> number of its COMPLETE trial."""
        from optuna.trial import TrialState

        return {t.user_attrs.get("key", ""): t.number for t in self._trials((TrialState.COMPLETE,))}

    def pending(self, keys: Iterable[str]) -> bool:
        """True while any of ``keys`` waits or runs (here or on another worker)."""
        from optuna.trial import TrialState

        keys = set(keys)
        return any(t.user_attrs.get("key") in keys for t in self._trials((TrialState.WAITING, TrialState.RUNNING)))

    # ------------------------------------------------------------------ writers
    @contextlib.contextmanager
    def _serial(self) -> Iterator[None]:
        """SQLite has no row locks (its ``FOR UPDATE`` is a no-op): serialise claims with a file lock.

        PostgreSQL and other servers need none; their ``SELECT ... FOR UPDATE`` makes a claim atomic.
        """
        if not self.url.startswith("sqlite:///"):
            yield
            return
        with open(self.url[len("sqlite:///"):] + ".queue.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def enqueue(self, cells: Dict[str, Dict[str, str]]) -> int:
        """Add a WAITING trial for every key of ``cells`` (key -> user attrs) not waiting, running or complete.

        Returns:
            How many trials were added.
        """
        with self._serial():
            held = self._held()
            missing = [key for key in cells if key not in held]
            for key in missing:
                self.study.enqueue_trial({}, user_attrs={**cells[key], "key": key})
        return len(missing)

    def claim(self, keys: Iterable[str]) -> Optional[Claim]:
        """Take the oldest WAITING trial whose key is in ``keys``; None when none is left."""
        from optuna.trial import TrialState

        keys = set(keys)
        with self._serial():
            for trial in self._trials((TrialState.WAITING,)):
                key = trial.user_attrs.get("key")
                if key not in keys or not self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
                    continue  # not ours to run, or another worker claimed it first
                self.storage.set_trial_system_attr(trial._trial_id, "worker", self.worker)
                self._beat(trial._trial_id)
                winner = self._owner(key, trial.number)
                if winner != trial.number:
                    self.storage.set_trial_user_attr(trial._trial_id, "duplicate_of", winner)
                    self.study.tell(trial.number, state=TrialState.PRUNED)
                    continue
                return Claim(key, trial.number, trial._trial_id)
        return None

    def _owner(self, key: str, mine: int) -> int:
        """The trial number that runs ``key``: a complete one, else the lowest running one.

        Waiting duplicates are claimed and dropped on the spot, so nobody else starts them.
        """
        from optuna.trial import TrialState

        for other in self._held().get(key, []):
            if other.number == mine or other.state != TrialState.WAITING:
                continue
            if self.storage.set_trial_state_values(other._trial_id, TrialState.RUNNING):
                self.storage.set_trial_user_attr(other._trial_id, "duplicate_of", mine)
                self.study.tell(other.number, state=TrialState.PRUNED)
        trials = self._held().get(key, [])
        complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            return complete[0]
        return min(t.number for t in trials if t.state == TrialState.RUNNING)

    @contextlib.contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[None]:
        """Record the claim's heartbeat every ``heartbeat_interval`` s while the cell runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                try:
                    self._beat(claim.trial_id)
                except Exception as err:  # noqa: BLE001 - a lost beat is retried; the cell goes on
                    print(f"[grid] heartbeat of trial {claim.number} failed: {err}", flush=True)

        thread = threading.Thread(target=beat, name=f"grid-heartbeat-{claim.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _beat(self, trial_id: int) -> None:
        """Optuna's heartbeat (which fails stale trials) and its time as a trial attribute, which
        ``meddiffaug grid --status`` reads (Optuna has no reader for its heartbeat table)."""
        self.storage.record_heartbeat(trial_id)
        self.storage.set_trial_system_attr(trial_id, "beat", time.time())

    def set_stage(self, claim: Claim, stage: str) -> None:
        """Record the pipeline stage the claimed cell is in, for ``--status``."""
        self.storage.set_trial_system_attr(claim.trial_id, "stage", stage)

    def workers_here(self) -> List[int]:
        """Pids of the live workers of this host holding a running cell (this worker's own included)."""
        from optuna.trial import TrialState

        pids = set()
        for trial in self._trials((TrialState.RUNNING,)):
            worker = trial.system_attrs.get("worker") or {}
            pid = int(worker.get("pid", 0))
            if worker.get("host") == self.worker["host"] and (pid == self.worker["pid"] or pid_alive(pid)):
                pids.add(pid)
        return sorted(pids)

    def finish(self, claim: Claim, value: Optional[float]) -> None:
        """Tell the trial COMPLETE with the cell's final metric, or FAIL (``value`` None)."""
        from optuna.trial import TrialState

        if value is None:
            self.study.tell(claim.number, state=TrialState.FAIL)
        else:
            self.study.tell(claim.number, float(value))

    def reap(self) -> int:
        """Fail (and re-queue) RUNNING trials whose worker died: stale heartbeat, or a dead pid here.

        Returns:
            How many trials of dead workers were failed by this call.
        """
        import optuna
        from optuna.trial import TrialState

        failed = []
        for trial in self._trials((TrialState.RUNNING,)):
            worker = trial.system_attrs.get("worker") or {}
            if worker.get("host") == self.worker["host"] and worker.get("pid") != self.worker["pid"] \
                    and not pid_alive(int(worker.get("pid", 0))):
                try:
                    if self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                        failed.append(trial._trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another worker failed it first
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for trial_id in failed:
            if retry is not None:
                retry(self.study, self.storage.get_trial(trial_id))
        before = len(self._trials((TrialState.FAIL,)))
        with warnings.catch_warnings():  # "experimental" since optuna 2.9
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)
        return len(failed) + len(self._trials((TrialState.FAIL,))) - before


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` runs on this host (a zombie, killed but not yet reaped, is dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
