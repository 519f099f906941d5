"""The stage lock: says who holds it, gives up after the configured timeout, leaves no file behind."""
from __future__ import annotations

import subprocess
import sys

import pytest

from experiments.cache.locks import StageLockTimeout, lock_timeout, stage_lock

HOLD = """import sys, time
sys.path.insert(0, {repo!r})
from experiments.cache.locks import stage_lock
with stage_lock(__import__("pathlib").Path({path!r})):
    print("held", flush=True)
    time.sleep(30)
"""


def test_waiter_names_the_holder_and_gives_up(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    path = tmp_path / "segment" / "abc.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(Path(__file__).parents[1]), path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MEDDIFFAUG_LOCK_TIMEOUT", "1.5")
        assert lock_timeout() == 1.5
        with pytest.raises(StageLockTimeout, match=f"pid {holder.pid} since .*MEDDIFFAUG_LOCK_TIMEOUT"):
            with stage_lock(path, poll_s=0.2):
                pass
        assert f"held by host" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    with stage_lock(path):  # the dead holder's lock is free again
        assert path.exists()
    assert not path.exists()


def test_bad_timeout_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MEDDIFFAUG_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MEDDIFFAUG_LOCK_TIMEOUT"):
        lock_timeout()
