"""What identifies a diffusion base in stage signatures: its content, not its name or path.

``diffusion.base_model: tiny`` names whatever base the repository ships; when that base is
re-pretrained, cached fine-tunes of the old one must not be reused. A local folder (an SD
checkpoint) mounted at another path on another machine is the same base and should reuse them.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Dict

import lightning_modules

# The shipped base's folder, found without importing lightning_modules.tiny_base (diffusers: seconds).
TINY_FOLDER = Path(lightning_modules.__file__).resolve().parent / "bases" / "tiny"

# Whole-file hashes up to this size (the shipped tiny base: about 11 MB); beyond it, the size plus
# the first and last MiB: re-hashing a multi-GB SD checkpoint for every signature would take
# seconds, and two different trainings of one architecture differ in those bytes too.
_FULL_HASH_BYTES = 64 * 2 ** 20
_EDGE_BYTES = 2 ** 20

# Shipped files whose wording changed but whose meaning did not: the training card's free-text note was
# reworded, no weight, config or figure changed. The earlier digest stands for the new one, so stages
# cached and recorded with the shipped base (sweeps/records/) keep their signatures.
_REWORDED = {("pretrain_metrics.json", "d0724b3f3ed272cb"): "276efccdba6847ef"}


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= _FULL_HASH_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(_EDGE_BYTES))
            handle.seek(size - _EDGE_BYTES)
            digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()[:16]


def base_folder(base_model: str) -> Path:
    """The diffusers folder a ``diffusion.base_model`` value names."""
    return TINY_FOLDER if base_model == "tiny" else Path(base_model).expanduser()


@lru_cache(maxsize=8)
def base_identity(base_model: str) -> Dict[str, str]:
    """``{relative file: digest}`` of every file of the base folder (empty when it is missing).

    Cached per process: a grid computes every cell's signature, and the files do not change under
    a running sweep. A missing folder is reported by the run's preflight check, not here.
    """
    folder = base_folder(base_model)
    if not folder.is_dir():
        return {}
    identity = {str(p.relative_to(folder)): _file_digest(p) for p in sorted(folder.rglob("*"))
                if p.is_file() and p.suffix != ".md"}  # the model card is documentation
    return {name: _REWORDED.get((name, digest), digest) for name, digest in identity.items()}
