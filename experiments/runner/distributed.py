"""The pipeline under a launcher (torchrun, SLURM's srun): which rank does what.

Every rank runs the whole command. Rank 0 takes the stage locks, decides per stage whether it is
cached, runs the non-training stages (generate, validate) alone, writes ``DONE`` and owns the
MLflow run. Training is joined by every rank: the training stages (finetune, segment), and the
validate stage's gate model before rank 0 runs the rest of that stage (``joint_training``). For each, the ranks
open a process group (Lightning's DDP strategy then uses it), train, meet at a barrier, and close
the group again, so rank 0's solo work never runs with a process group that the other ranks
would have to join (torchmetrics would wait for them). Between stages the other ranks wait on
the launcher's key-value store (``torch.distributed.TCPStore``) for rank 0's decision and metrics,
then read the finished artifacts. Rank and world size come from Lightning's cluster environments
(:class:`TorchElasticEnvironment`, :class:`SLURMEnvironment`).
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

TRAINING_STAGES = ("finetune", "segment")


def launcher() -> Any:
    """The cluster environment of an external launcher that started more than one process, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for cls in (TorchElasticEnvironment, SLURMEnvironment):
        if cls.detect():
            env = cls()
            if env.world_size() > 1:
                return env
    return None


def global_rank() -> int:
    """This process's rank under a launcher; 0 otherwise."""
    env = launcher()
    return env.global_rank() if env is not None else 0


def launcher_devices() -> Optional[Tuple[int, int]]:
    """``(devices per node, num_nodes)`` a Trainer must use under a launcher (None without one).

    Lightning checks that their product equals the launcher's world size; the processes per node
    are the launcher's (``LOCAL_WORLD_SIZE`` of torchrun, ``SLURM_NTASKS_PER_NODE`` of SLURM).
    """
    env = launcher()
    if env is None:
        return None
    per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or env.world_size()
    per_node = int(str(per_node).split("(")[0])  # SLURM may write "2(x3)"
    return per_node, max(1, env.world_size() // per_node)


class Coordinator:
    """Rank 0's decisions and metrics, shared with the other ranks through the launcher's store."""

    def __init__(self, env: Any, accelerator: str):
        import torch.distributed as dist

        from experiments.cache.locks import lock_timeout

        self.rank, self.world_size = env.global_rank(), env.world_size()
        os.environ.setdefault("MASTER_ADDR", env.main_address)  # SLURM: Lightning derives them
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        self.timeout = timedelta(seconds=lock_timeout())
        self.store, _, _ = next(dist.rendezvous("env://", rank=self.rank, world_size=self.world_size,
                                                timeout=self.timeout))
        self.backend = "nccl" if accelerator in ("gpu", "cuda") else "gloo"
        self._step = 0

    def _key(self, name: str) -> str:
        return f"meddiffaug/{self._step}/{name}"

    def publish(self, name: str, value: Any) -> None:
        self.store.set(self._key(name), json.dumps(value))

    def receive(self, name: str) -> Any:
        self.store.wait([self._key(name)], self.timeout)
        return json.loads(self.store.get(self._key(name)))

    @contextlib.contextmanager
    def process_group(self, what: str) -> Iterator[None]:
        """A fresh process group for one training stage (a new key prefix: no stale rendezvous keys)."""
        import torch.distributed as dist

        dist.init_process_group(self.backend, store=dist.PrefixStore(self._key("pg"), self.store),
                                rank=self.rank, world_size=self.world_size, timeout=self.timeout)
        print(f"[meddiffaug] rank {self.rank}/{self.world_size} joins training ({self.backend}): {what}", flush=True)
        try:
            yield
            dist.barrier()  # every rank is done with the .partial folder before rank 0 renames it
        finally:
            dist.destroy_process_group()

    def run_stage(self, stage: str, lock: Path, read: Callable[[], Optional[Dict[str, float]]],
                  compute: Callable[[bool], Dict[str, float]], finish: Callable[[Dict[str, float]], None],
                  joint_training: Optional[Tuple[Callable[[], bool], Callable[[], None]]] = None,
                  ) -> Tuple[Dict[str, float], bool]:
        """One stage on every rank; returns ``(metrics, cached)`` (rank 0's metrics on all ranks).

        Args:
            stage: stage name.
            lock: the stage's lock file (rank 0 holds it for the whole stage).
            read: the cached metrics, or None.
            compute: runs the stage function; its argument says whether to write ``DONE`` itself.
            finish: writes ``DONE`` and moves the stage folder into place (rank 0, after training).
            joint_training: for a stage rank 0 runs alone: ``(needed, train)``; when rank 0 finds
                ``needed()``, every rank first runs ``train()`` together (the validate stage's gate model).
        """
        from experiments.cache.locks import stage_lock

        self._step += 1
        if self.rank != 0:
            plan = self.receive("plan")
            if plan == "train":
                with self.process_group(stage):
                    compute(False)
            elif plan == "train_first":
                with self.process_group(f"{stage} (its model)"):
                    joint_training[1]()
            return self.receive("done"), plan == "cached"
        with stage_lock(lock):
            metrics = read()
            plan = "cached" if metrics is not None else "train" if stage in TRAINING_STAGES else "solo"
            if plan == "solo" and joint_training is not None and joint_training[0]():
                plan = "train_first"  # every rank trains the stage's model, then rank 0 runs the stage alone
            self.publish("plan", plan)
            if plan == "train_first":
                with self.process_group(f"{stage} (its model)"):
                    joint_training[1]()
            if plan == "train":
                with self.process_group(stage):
                    metrics = compute(False)
                finish(metrics)
            elif plan != "cached":  # solo, or train_first once its model is trained
                metrics = compute(True)
        self.publish("done", metrics)
        return metrics, plan == "cached"


_COORDINATOR: Dict[str, Coordinator] = {}


def coordinator(accelerator: str) -> Optional[Coordinator]:
    """The process's coordinator under a launcher (created once), else None."""
    env = launcher()
    if env is None:
        return None
    if "c" not in _COORDINATOR:
        _COORDINATOR["c"] = Coordinator(env, accelerator)
    return _COORDINATOR["c"]
