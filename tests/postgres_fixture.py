"""A throwaway PostgreSQL cluster for tests: ``initdb`` + ``pg_ctl`` in a temporary folder on a free port.

Use it with ``from postgres_fixture import postgres_server  # noqa: F401`` and ask for the fixture
``postgres_server`` (module scope), then :func:`new_database` for an empty database per test. The
server refuses to run as root, so under root (CI, containers) it runs as the unprivileged
``postgres`` user (``MEDDIFFAUG_PG_USER``). Binaries come from ``MEDDIFFAUG_PG_BIN`` (default: the
first ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``); tests are skipped, with the
reason, only where no binaries or no driver exist.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from fakes import free_port


def _bin_dir() -> Path:
    if os.environ.get("MEDDIFFAUG_PG_BIN"):
        return Path(os.environ["MEDDIFFAUG_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(found[0]).parent if found else Path("/usr/lib/postgresql/15/bin")


def _as_server_user(folder: Path) -> List[str]:
    """Command prefix that runs the server as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return []
    name = os.environ.get("MEDDIFFAUG_PG_USER", "postgres")
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"running as root and no unprivileged user '{name}' to run PostgreSQL as "
                    "(set MEDDIFFAUG_PG_USER)")
    os.chown(folder, user.pw_uid, user.pw_gid)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """URL of a running, empty PostgreSQL server (superuser ``postgres``, trust auth on 127.0.0.1)."""
    bin_dir = _bin_dir()
    if not (bin_dir / "initdb").is_file():
        pytest.skip(f"no PostgreSQL server binaries (initdb, pg_ctl) in {bin_dir}; set MEDDIFFAUG_PG_BIN")
    # The lock installs the driver: its absence is an install fault, never a reason to skip.
    import psycopg  # noqa: F401 - fails with ModuleNotFoundError; fix: pip install -e '.[postgres]'
    folder = Path(tempfile.mkdtemp(prefix="meddiffaug-pg-", dir="/tmp"))  # short: socket paths are limited
    os.chmod(folder, 0o755)
    prefix = _as_server_user(folder)
    data, port = folder / "data", free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120, cwd=folder)
    try:
        subprocess.run(prefix + [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                 "-E", "UTF8", "--no-sync"], **run)
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
                                 "-o", options, "-w", "start"], **run)
    except subprocess.CalledProcessError as err:
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {err.stderr}\n{log}") from err
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server_url: str) -> str:
    """Create an empty database on ``server_url``; return its SQLAlchemy URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    # autocommit: CREATE DATABASE cannot run in a transaction
    connection = psycopg.connect(f"{server_url}/postgres", autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return f"{server_url}/{name}"
