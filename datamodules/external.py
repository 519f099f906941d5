"""External test sets: whole datasets from elsewhere, tested once after training, never split.

An external set is every pair of another dataset (a registered dataset or a ``folder`` at its own
root) or a procedural kind's center B (:mod:`datamodules.procedural_center_b`). It is built beside
the run's datamodule, never inside it, so its pairs cannot reach a training, validation or
calibration split; :func:`training_overlap` refuses a set that holds one of the run's own images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from datamodules.base import SegmentationDataset
from datamodules.errors import DataError

#: The splits whose pairs train, validate, calibrate or select (everything but the in-domain test).
TRAINING_SPLITS = ("train", "train_few", "val", "normal")


@dataclass
class ExternalSet:
    """One external test set, decoded and resized to the run's image size.

    Attributes:
        label: the set's name in metric keys (``test/<label>/dice``).
        name: registered dataset name (``cvc_clinicdb``, ``folder``, ``procedural_polyp``).
        source: where it comes from, a URI (``file:///…`` or ``procedural://…``).
        images: uint8 (N,S,S,3).
        masks: uint8 (N,S,S) class indices.
        ids: N sample ids (file stems, or ``<kind>_center_b_<i>``).
        classes: class names, index 0 = background.
    """

    label: str
    name: str
    source: str
    images: np.ndarray
    masks: np.ndarray
    ids: list
    classes: tuple
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:16]

    def dataset(self) -> SegmentationDataset:
        """Every pair, no transform: samples ``{"image" (3,S,S), "mask" (S,S), "id"}``."""
        return SegmentationDataset(self.images, self.masks, self.ids, range(len(self.ids)))


def load_external_set(name: str, label: str, image_size: int, root: Optional[str] = None,
                      center: Optional[str] = None, n: Optional[int] = None,
                      cache_dir: Optional[str] = None, **layout_kw: Any) -> ExternalSet:
    """Decode one external set (all of its pairs).

    Args:
        name: a registered dataset; ``procedural_<kind>`` needs ``center="b"`` and ``n``.
        label: the set's name in metric keys.
        image_size: the run's side ``S``.
        root: the dataset folder (file-based datasets).
        center: ``"b"`` for a procedural kind's second center.
        n: pairs of a procedural center-B pool.
        cache_dir: decoded-array cache of file-based datasets (as ``data.cache_dir``).
        **layout_kw: layout options (``classes`` for ``folder``).

    Raises:
        DataError: the folder holds no readable pair of the layout, or a bad combination of keys.
    """
    from datamodules import PROCEDURAL_NAMES, create_datamodule

    if name.startswith("procedural_") and name[len("procedural_"):] in PROCEDURAL_NAMES:
        from datamodules.procedural import PROCEDURAL_KINDS
        from datamodules.procedural_center_b import render_center_b

        kind = name[len("procedural_"):]
        if center != "b" or n is None:
            raise DataError(f"external test set {label!r}: {name} needs center: b and a pool size n")
        images, masks = render_center_b(kind, int(n), int(image_size))
        ids = [f"{kind}_center_b_{i:05d}" for i in range(len(images))]
        return ExternalSet(label, name, f"procedural://{name}?center=b&n={n}", images, masks, ids,
                           tuple(PROCEDURAL_KINDS[kind].classes))
    if root is None:
        raise DataError(f"external test set {label!r}: dataset {name} needs a root (the folder holding it)")
    dm = create_datamodule(name, root=root, image_size=image_size, cache_dir=cache_dir, n_real=None, **layout_kw)
    images, masks, ids, *_ = dm._load_source()  # every pair, no split: the whole set is the test set
    if len(ids) == 0:
        raise DataError(f"external test set {label!r}: no image–mask pair under {root}")
    classes = tuple(dm.layout.classes_for(int(masks.max())))
    return ExternalSet(label, name, Path(root).expanduser().resolve().as_uri(), images, masks, list(ids), classes)


def _image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def training_overlap(external: ExternalSet, datamodule: Any) -> list:
    """Pairs of ``external`` whose image is also one the run trains, validates or selects on.

    Compared by content (the decoded, resized image bytes), so a copied or renamed file is found as
    well as the same file; a same-named file with other content (two centers both numbering from
    1) is not an overlap.

    Returns:
        ``[(external id, run id, split)]``, empty when the set is disjoint from the run's data.
    """
    seen = {}
    for split in TRAINING_SPLITS:
        for i in datamodule.split_indices.get(split, []):  # one image at a time: no copy of the split
            seen.setdefault(_image_hash(datamodule.images[i]), (datamodule.ids[i], split))
    hits = ((eid, seen.get(_image_hash(im))) for eid, im in zip(external.ids, external.images))
    return [(eid, *hit) for eid, hit in hits if hit is not None]
