"""A killed run's gate-data folder is removed by the next gate training on that host; a live one is kept."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from experiments.runner.gate_training import _remove_stale_banks


def test_only_folders_of_dead_processes_of_this_host_are_removed(tmp_path):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone now
    stale = tmp_path / f"validator_bank_{host}_{dead.pid}_abc"
    live = tmp_path / f"validator_bank_{host}_{os.getpid()}_def"
    other_host = tmp_path / f"validator_bank_elsewhere_{dead.pid}_ghi"
    for folder in (stale, live, other_host):
        folder.mkdir()
    _remove_stale_banks(tmp_path)
    assert not stale.exists() and live.exists() and other_host.exists()
