"""Dataset registry: ``create_datamodule(name, **cfg)`` builds a ``SegmentationDataModule``.

Adding a dataset = one module defining a ``Layout`` decorated with ``@register_dataset(name)``
plus its name in ``_LAYOUT_MODULES`` below.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for updates on import (a network call): disable it before anything
# in this package, or any package importing this one, imports albumentations.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import importlib  # noqa: E402
import inspect as _inspect  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any, Callable  # noqa: E402

from datamodules.errors import DataError, did_you_mean  # noqa: E402

#: name -> Layout subclass (file-based datasets) or factory ``(**cfg) -> SegmentationDataModule``.
DATASETS: dict[str, Any] = {}

# One line per file-based dataset module; importing it registers its layout.
_LAYOUT_MODULES = ("kvasir_seg", "cvc_clinicdb", "refuge2", "isic2018", "busi", "folder")
PROCEDURAL_NAMES = ("polyp", "fundus", "skin", "ultrasound")


def register_dataset(name: str) -> Callable[[Any], Any]:
    """Class/function decorator that registers a dataset under ``name``.

    Args:
        name: Registry key used in ``cfg.data.name``.

    Returns:
        The decorator; it returns its argument unchanged.
    """

    def deco(obj: Any) -> Any:
        if name in DATASETS and DATASETS[name] is not obj:
            raise ValueError(f"dataset name {name!r} is registered twice")
        DATASETS[name] = obj
        return obj

    return deco


def get_layout(name: str):
    """Return the ``Layout`` class registered as ``name`` (file-based datasets only).

    Raises:
        DataError: ``name`` is unknown or is not a file-based dataset.
    """
    from datamodules.pairs import Layout

    entry = _lookup(name)
    if not (isinstance(entry, type) and issubclass(entry, Layout)):
        raise DataError(f"dataset {name!r} is not read from files (no layout to inspect)")
    return entry


def _lookup(name: str) -> Any:
    if name not in DATASETS:
        valid = sorted(DATASETS)
        raise DataError(f"unknown dataset {name!r}.{did_you_mean(name, valid)} Valid names: {', '.join(valid)}")
    return DATASETS[name]


def create_datamodule(name: str, **cfg: Any):
    """Build the datamodule registered as ``name``.

    Args:
        name: Registry key, e.g. ``"kvasir_seg"`` or ``"procedural_polyp"``.
        **cfg: Fields of ``cfg.data`` minus ``name`` (root, image_size, n_real, ...), plus
            optional ``split_file`` and layout options (e.g. ``classes`` for ``folder``).

    Returns:
        A ``SegmentationDataModule`` (call ``.setup()`` before reading arrays).

    Raises:
        DataError: Unknown name (the message lists the valid names and the closest one).
    """
    from datamodules.base import SegmentationDataModule
    from datamodules.pairs import Layout

    entry = _lookup(name)
    cfg.pop("external_tests", None)  # other datasets, loaded beside this one (datamodules/external.py)
    if isinstance(entry, type) and issubclass(entry, Layout):
        # Layout options (e.g. folder's ``classes``) go to the layout, the rest to the module.
        params = set(_inspect.signature(entry.__init__).parameters) - {"self"}
        layout_kw = {k: cfg.pop(k) for k in list(cfg) if k in params}
        return SegmentationDataModule(layout=entry(**layout_kw), **cfg)
    return entry(**cfg)


def _procedural(kind: str, **cfg: Any):
    # Imported lazily: datamodules/procedural.py is optional for file-based datasets.
    from datamodules.procedural_data import ProceduralDataModule

    return ProceduralDataModule(kind=kind, **cfg)


for _kind in PROCEDURAL_NAMES:
    DATASETS[f"procedural_{_kind}"] = partial(_procedural, _kind)

for _mod in _LAYOUT_MODULES:
    importlib.import_module(f"datamodules.{_mod}")

__all__ = ["DATASETS", "DataError", "create_datamodule", "get_layout", "register_dataset"]
