"""A dataset's identity in stage signatures: its content, not the path it is mounted at.

Machines that share one ``artifacts/`` folder often mount the same dataset at different paths; a
signature that hashed ``data.root`` would make each of them recompute every stage. The identity
is the datamodule's own cache key (layout, ids, each file's relative path, size and mtime), so a
copy that keeps mtimes (``rsync -a``, a shared mount) reuses the cache and an edited file does
not. Procedural data has no root and keeps its old signatures.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def data_root_identity(cfg: DictConfig) -> Optional[str]:
    """``"content:<hash>"`` for a dataset folder, ``None`` for procedural data (no root).

    Raises:
        DataError: the folder does not hold the dataset's layout.
    """
    if cfg.data.root is None:
        return None
    return _content_key(json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _content_key(data_json: str) -> str:
    """Cached per process: a grid resolves hundreds of cells over the same folder."""
    from datamodules import create_datamodule
    from datamodules.pairs import natural_key

    kwargs = json.loads(data_json)
    root = kwargs["root"]
    datamodule: Any = create_datamodule(kwargs.pop("name"), **kwargs)
    layout = getattr(datamodule, "layout", None)
    if layout is None:  # a dataset without a file layout: its root is all we know
        return root
    records = sorted(layout.find(datamodule.root), key=lambda r: natural_key(r.id))
    return f"content:{datamodule._cache_key(records)}"


def folder_identity(name: str, root: str, **options) -> str:
    """``"content:<hash>"`` of a dataset folder outside ``cfg.data`` (an external test set), as for
    :func:`data_root_identity`: its content, not the path it is mounted at."""
    return _content_key(json.dumps({"name": name, "root": root, **options}, sort_keys=True))
