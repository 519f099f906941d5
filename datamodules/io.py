"""Shared I/O of the library and the pipeline: atomic writes, synthetic pairs, manifests, the hash.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed
run leaves either the old file or the new one, never a truncated PNG, manifest line or checkpoint.
Both library folders (``datamodules/``, ``lightning_modules/``) and the orchestration import it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
from PIL import Image

from datamodules.errors import DataError

PathLike = Union[str, Path]


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb", fsync: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then rename it onto ``path``.

    ``fsync=False`` still survives a killed process (the rename is atomic) but not a power cut;
    PNGs use it because an fsync per file dominates generation time on network disks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str, fsync: bool = True, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`).

    Encoded explicitly (not by the locale) so tables with ``±`` read the same on every machine.
    """
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def short_hash(payload: Any, n: int = 16) -> str:
    """A stable short hex hash of a JSON-able payload (keys sorted; other objects by ``str``).

    The one hash of the project: stage signatures, grid cells, study trials and caches use it.
    """
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def write_png(path: PathLike, array: np.ndarray) -> Path:
    """Write uint8 (H,W,3) RGB or (H,W) class indices as a lossless PNG, atomically."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"PNG arrays must be uint8, got {array.dtype} for {path}")
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), fsync=False)


def read_image(path: PathLike) -> np.ndarray:
    """uint8 (H,W,3) RGB; DataError naming the file if it is missing or unreadable."""
    return np.array(_open(path).convert("RGB"))  # a writable copy (torch.from_numpy warns otherwise)


class ImageFiles:
    """Images read from disk only when sliced: ``files[i:j]`` is uint8 (j-i,H,W,3), ``len(files)`` the count.

    Lets a consumer that walks a set a batch at a time (FID features) hold one batch, not the set.
    """

    def __init__(self, paths: Sequence[PathLike]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice) -> np.ndarray:
        return np.stack([read_image(p) for p in self.paths[index]])


def read_mask(path: PathLike) -> np.ndarray:
    """uint8 (H,W) class indices (a PNG written by :func:`write_png`)."""
    im = _open(path)
    arr = np.array(im if im.mode in ("L", "P", "I", "I;16") else im.convert("L"))
    return arr.astype(np.uint8)


def _open(path: PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"synthetic pair file {path} does not exist; rerun the generate/validate "
                        f"stage or remove its line from the manifest")
    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read synthetic pair file {path} ({type(e).__name__}: {e}); "
                        f"delete it and rerun the stage that wrote it") from e


def write_pair(root: PathLike, sample_id: str, image: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """Write ``images/<id>.png`` and ``masks/<id>.png`` under ``root``.

    Args:
        root: Stage folder.
        sample_id: File stem.
        image: uint8 (S,S,3).
        mask: uint8 (S,S) class indices.

    Returns:
        (image path, mask path) relative to ``root`` (posix strings, as stored in the manifest).
    """
    root = Path(root)
    rel_img, rel_mask = f"images/{sample_id}.png", f"masks/{sample_id}.png"
    write_png(root / rel_img, image)
    write_png(root / rel_mask, mask)
    return rel_img, rel_mask


def read_manifest(path: PathLike, missing_ok: bool = True) -> list[dict]:
    """Records of a ``.jsonl`` manifest (blank lines skipped).

    Raises:
        DataError: the file is missing (unless ``missing_ok``) or a line is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise DataError(f"manifest {path} does not exist; run the stage that writes it first")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n} is not valid JSON ({e}); delete the line or "
                                f"the manifest and rerun the stage") from e
    return records


def write_manifest(path: PathLike, records: Iterable[dict]) -> Path:
    """Rewrite the whole manifest atomically (one JSON object per line, sorted keys)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    return atomic_write(path, lambda f: f.write(text), mode="w")


def append_manifest(path: PathLike, records: Iterable[dict]) -> Path:
    """Add records by an atomic rewrite (a manifest of a few thousand lines rewrites in ms)."""
    return write_manifest(path, read_manifest(path) + list(records))


def resolve(path: str, base: PathLike) -> Path:
    """A manifest path: absolute as is, else relative to the manifest's folder ``base``."""
    p = Path(path)
    return p if p.is_absolute() else Path(base) / p
