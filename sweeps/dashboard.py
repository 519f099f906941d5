"""``meddiffaug dashboard [STORAGE_URL]``: optuna-dashboard on 127.0.0.1 for a study storage.

The storage is what ``meddiffaug sweep`` and ``meddiffaug grid`` write: a SQLite file or a
PostgreSQL URL. Sweeps appear under their study name, grid queues as ``grid:<name>`` (one trial
per cell run: its state, worker, stage and retries). The server runs in this interpreter, as
``meddiffaug ui`` runs MLflow from it, so it works from a shell without the venv on ``PATH``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import List, Optional

from experiments.config import ConfigError

DEFAULT_STORAGE = "sqlite:///outputs/optuna.db"  # where sweeps and grids with the default stores write


def shown(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print)."""
    return re.sub(r"^([a-z0-9+]+://[^:/@]*:)[^@]*@", r"\1***@", url)


def main(argv: Optional[List[str]] = None) -> int:
    """``meddiffaug dashboard [STORAGE_URL] [--port 8080]``: optuna-dashboard on 127.0.0.1."""
    parser = argparse.ArgumentParser(prog="meddiffaug dashboard", description=main.__doc__)
    parser.add_argument("storage", nargs="?", default=DEFAULT_STORAGE,
                        help=f"Optuna storage URL, e.g. postgresql://user@host/db (default: {DEFAULT_STORAGE})")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if args.storage.startswith("sqlite:///") and not Path(args.storage[len("sqlite:///"):]).is_file():
        raise ConfigError(f"no study database at {args.storage[len('sqlite:///'):]}: run `meddiffaug sweep` or "
                          f"`meddiffaug grid` first, or pass the storage URL they used (--storage)")
    import optuna
    import optuna_dashboard

    from sweeps.queue import rdb_storage

    storage = rdb_storage(args.storage)  # the same storage class the workers use; a missing driver says what to install
    names = optuna.study.get_all_study_names(storage)
    print(f"Studies in {shown(args.storage)}: {', '.join(names) or 'none yet'}", flush=True)
    print(f"optuna-dashboard: http://{args.host}:{args.port}", flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0
