"""``meddiffaug dashboard``: optuna-dashboard on 127.0.0.1 for the studies and grid queues of a storage."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fakes import free_port


def test_a_missing_sqlite_storage_is_named_and_nothing_is_created(tmp_path, capsys):
    from sweeps.cli import main

    assert main(["dashboard", f"sqlite:///{tmp_path}/nope.db"]) == 2
    assert f"no study database at {tmp_path}/nope.db" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()


def test_a_printed_storage_url_hides_its_password():
    from sweeps.dashboard import shown

    assert shown("postgresql://me:secret@db:5432/optuna") == "postgresql://me:***@db:5432/optuna"


@pytest.mark.slow
def test_dashboard_serves_the_studies_of_a_storage(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="grid:t_dash", storage=url)
    script = Path(sys.executable).parent / "meddiffaug"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # a fresh shell: no .venv/bin
    process = subprocess.Popen([str(script), "dashboard", url, "--port", str(port)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, status, studies = time.time() + 120, None, ""
        while time.time() < deadline and process.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
                studies = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert status == 200, f"the dashboard did not answer; exit {process.poll()}"
        assert "grid:t_dash" in studies
    finally:
        os.killpg(process.pid, 15)
        output, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in output and "Studies in sqlite:///" in output
