"""The stage lock: one process (on any machine sharing ``artifacts/``) computes a stage at a time.

An advisory ``flock`` on ``artifacts/<stage>/<sig>.lock`` (released by the OS if its holder dies;
on a network filesystem it needs working NFS locking). The holder writes who it is into the file,
so a waiting process prints who holds the lock and since when, and gives up after
``MEDDIFFAUG_LOCK_TIMEOUT`` seconds (default 24 h) with an error naming the holder. The holder
removes the file when it is done, so a finished pipeline leaves no ``.lock`` behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

LOCK_TIMEOUT_ENV = "MEDDIFFAUG_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 24 * 3600.0


class StageLockTimeout(TimeoutError):
    """Waited longer than the lock timeout for another process's stage."""


def lock_timeout() -> float:
    """Seconds to wait for a stage lock: ``$MEDDIFFAUG_LOCK_TIMEOUT`` or 24 h."""
    text = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        return float(text) if text else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds.") from None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "an unknown process"
    return f"host {info.get('host')} pid {info.get('pid')} since {info.get('since')}"


@contextlib.contextmanager
def stage_lock(path: Path, timeout_s: Optional[float] = None, poll_s: float = 1.0) -> Iterator[None]:
    """Hold the exclusive lock ``path`` for the body; wait (saying for whom) up to ``timeout_s``.

    Raises:
        StageLockTimeout: the lock was still held after ``timeout_s`` (default :func:`lock_timeout`).
    """
    timeout = lock_timeout() if timeout_s is None else timeout_s
    path = Path(path)
    start, told = time.time(), False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except PermissionError as err:
            from experiments.config import ConfigError

            raise ConfigError(f"cannot write the stage cache {err.filename or path} (permission denied): make "
                              f"it writable by you, or set artifacts_dir=<a folder you can write>") from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = _holder(path)
            if not told:
                print(f"[meddiffaug] waiting for {path}: held by {holder}", flush=True)
                told = True
            if time.time() - start > timeout:
                raise StageLockTimeout(
                    f"gave up after {timeout:.0f} s waiting for the stage lock {path}, held by {holder}. "
                    f"If that process is gone, delete the file; wait longer with {LOCK_TIMEOUT_ENV}=<seconds>.")
            time.sleep(poll_s)
            continue
        try:  # the previous holder may have removed the file after we opened it: lock the live one
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before unlocking: a waiter that locked this inode then sees it is stale
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
