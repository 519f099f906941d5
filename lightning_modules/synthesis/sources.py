"""Which real training images a synthetic lesion is painted into.

Two modes, one per paper:

* ``normal`` (DiffAug): lesion-free images. With a normal pool (``data.n_normal``: lesion-free
  images outside the label budget, ``split_indices["normal"]``) they come from it; else from the
  training split. A few-shot subset often holds none, so lesion-bearing images then serve their
  *lesion-free regions* (existing lesions are blocked for placement and kept in the label).
* ``real`` (MedDiff-FT): any real training image; the new lesion goes elsewhere.

Either way the label of the synthetic pair is the union of the source's existing lesions and the
new one, so an existing lesion is never labelled background. Only ``train_few`` indices (and the
normal pool, which lies outside every split) are ever sources: val/test images must not leak into
training data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from lightning_modules.synthesis.masks import fov_from_image


@dataclass
class Source:
    """One source image for a synthetic pair.

    Attributes:
        index: Row of the datamodule arrays (``images[index]``).
        id: The real sample's id.
        kind: ``normal_image``, ``lesion_free_region`` or ``real``.
        image: uint8 (S,S,3).
        existing: uint8 (S,S) class indices of the lesions already there (zeros for normal).
        fov: bool (S,S) field of view derived from the image (non-black pixels).
    """

    index: int
    id: str
    kind: str
    image: np.ndarray
    existing: np.ndarray
    fov: np.ndarray

    @property
    def occupied(self) -> np.ndarray:
        """bool (S,S) pixels the new lesion must stay away from."""
        return self.existing > 0


def source_pool(masks: np.ndarray, train_indices: Sequence[int], mode: str,
                normal_indices: Optional[Sequence[int]] = None) -> tuple[list, str]:
    """Candidate source indices and their kind for ``mode``.

    Args:
        masks: uint8 (N,S,S) masks of the whole datamodule.
        train_indices: The few-shot training indices (``split_indices["train_few"]``).
        mode: ``normal`` or ``real``.
        normal_indices: The normal pool (``split_indices["normal"]``), the sources of ``normal``
            mode when non-empty; ``None`` or empty: lesion-free images of ``train_indices``.

    Returns:
        (indices, kind); raises ValueError when no training image exists.
    """
    if mode not in ("normal", "real"):
        raise ValueError(f"source mode must be 'normal' or 'real', got {mode!r}")
    train = [int(i) for i in train_indices]
    if not train:
        raise ValueError("no training images to use as sources (split_indices['train_few'] is empty)")
    if mode == "real":
        return train, "real"
    if normal_indices:
        return [int(i) for i in normal_indices], "normal_image"
    normal = [i for i in train if not masks[i].any()]
    if normal:
        return normal, "normal_image"
    return train, "lesion_free_region"


def pick_sources(images: np.ndarray, masks: np.ndarray, ids: Sequence[str],
                 train_indices: Sequence[int], n: int, rng: np.random.Generator,
                 mode: str = "real") -> list[Source]:
    """Pick ``n`` sources, balanced: each pool image is used ``n/len(pool)`` times (±1).

    A concatenation of shuffled passes over the pool rather than i.i.d. draws: with 16 real
    images an i.i.d. draw of 64 leaves some images unused by chance.

    Args:
        images: uint8 (N,S,S,3) images of the datamodule.
        masks: uint8 (N,S,S) class-index masks.
        ids: N sample ids.
        train_indices: ``split_indices["train_few"]`` — the only allowed sources.
        n: Number of sources to return.
        rng: Draws the order (the only randomness here).
        mode: ``normal`` or ``real`` (see the module docstring).

    Returns:
        n :class:`Source` objects.
    """
    pool, kind = source_pool(masks, train_indices, mode)
    return [make_source(images, masks, ids, i, kind) for i in source_order(pool, n, rng)]


def source_order(pool: Sequence[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` pool indices as concatenated shuffled passes over ``pool`` (the draw of :func:`pick_sources`)."""
    order: list[int] = []
    while len(order) < n:
        order.extend(int(pool[k]) for k in rng.permutation(len(pool)))
    return order[:n]


def make_source(images: np.ndarray, masks: np.ndarray, ids: Sequence[str], index: int,
                kind: str) -> Source:
    """Build the :class:`Source` of one datamodule row."""
    existing = np.asarray(masks[index], np.uint8).copy()
    if kind == "normal_image":
        existing[:] = 0
    return Source(index=int(index), id=str(ids[index]), kind=kind,
                  image=np.asarray(images[index], np.uint8), existing=existing,
                  fov=fov_from_image(np.asarray(images[index], np.uint8)))


def union_label(existing: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Label of a synthetic pair: existing lesions plus the new one (new wins where both set).

    Args:
        existing: uint8 (S,S) class indices already in the source image.
        new: uint8 (S,S) class indices of the generated lesion.

    Returns:
        uint8 (S,S).
    """
    out = np.asarray(existing, np.uint8).copy()
    out[new > 0] = new[new > 0]
    return out
