"""Grid workers on one host share its cores, whichever process or terminal started them.

Before each cell and each stage a worker counts the live workers of its host that hold a cell on
the queue (:meth:`sweeps.queue.CellQueue.workers_here`) and sets its torch intra-op threads to its
cores over that count, so a second ``meddiffaug grid`` on the same machine halves the threads of
both instead of oversubscribing the cores. A process's cores are its CPU affinity (what ``taskset``, cgroups or SLURM
give it), capped by ``SLURM_CPUS_PER_TASK``; workers with disjoint affinity (separate SLURM tasks)
do not count each other. ``OMP_NUM_THREADS`` set by the user wins: the worker then keeps it.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Set, Tuple


def _affinity(pid: int = 0) -> Optional[Set[int]]:
    try:
        return set(os.sched_getaffinity(pid))
    except (AttributeError, OSError):  # no affinity API (macOS), or the process is gone
        return None


def cores_given() -> Tuple[int, str]:
    """The cores this process may use, and where that number comes from."""
    mine = _affinity()
    cores, source = (len(mine), "CPU affinity") if mine else (os.cpu_count() or 1, "cpu_count")
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and 0 < int(slurm) < cores:
        return int(slurm), "SLURM_CPUS_PER_TASK"
    return cores, source


def sharing(pids: Iterable[int]) -> int:
    """How many of ``pids`` (this process included) may run on this process's cores."""
    mine = _affinity()
    count = 0
    for pid in set(pids) | {os.getpid()}:
        theirs = _affinity(pid) if pid != os.getpid() else mine
        count += mine is None or theirs is None or bool(mine & theirs)
    return count


class CoreShare:
    """Sets this worker's torch threads from the workers sharing its cores; says so when it changes."""

    def __init__(self) -> None:
        self.threads: Optional[int] = None

    def update(self, pids: Iterable[int]) -> int:
        """Apply the share for the live worker ``pids`` of this host; returns the thread count."""
        import torch

        explicit = os.environ.get("OMP_NUM_THREADS", "")
        if explicit.isdigit() and int(explicit) > 0:
            threads, why = int(explicit), "OMP_NUM_THREADS is set"
        else:
            cores, source = cores_given()
            workers = sharing(pids)
            threads = max(1, cores // workers)
            why = f"{cores} cores ({source}) shared by {workers} worker{'s' * (workers > 1)} of this host"
        if threads != self.threads:
            torch.set_num_threads(threads)
            print(f"[grid] {threads} torch thread{'s' * (threads > 1)}: {why}", flush=True)
            self.threads = threads
        return threads
