"""``ProceduralDataModule``: the embedded procedural datasets, with an optional fixed test pool.

Three kinds of content, from disjoint random streams (:func:`datamodules.procedural.render_procedural`):

* the run's own content, ``n_procedural`` pairs of ``data.procedural_seed``: train and validation
  (and test, without a test pool) are split from it, so each seed of a grid whose seed keys hold
  ``data.procedural_seed`` draws its own training data;
* with ``data.test_pool = N``: the test split is N pairs of the reserved test stream, identical for
  every seed and method and disjoint from every training pool;
* with ``data.n_normal = M``: M lesion-free images of the run's content seed on the normal stream,
  the pool of sources (``split_indices["normal"]``), never in a split.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from datamodules.base import SegmentationDataModule
from datamodules.errors import DataError


class ProceduralDataModule(SegmentationDataModule):
    """Embedded procedural data (``datamodules.procedural``), no files needed.

    Args:
        kind: ``polyp``, ``fundus``, ``skin`` or ``ultrasound``.
        **kwargs: As for ``SegmentationDataModule`` (``root`` is ignored; ``n_procedural`` and
            ``procedural_seed`` set the pool size and content, ``test_pool`` the fixed test pool,
            ``n_normal`` the lesion-free pool).
    """

    def __init__(self, kind: str, **kwargs: Any):
        super().__init__(layout=None, **kwargs)
        from datamodules.procedural import PROCEDURAL_KINDS

        if kind not in PROCEDURAL_KINDS:
            raise DataError(f"unknown procedural kind {kind!r}; use one of "
                            f"{sorted(PROCEDURAL_KINDS)}")
        if self.test_pool is not None and int(self.test_pool) < 1:
            raise DataError(f"data.test_pool={self.test_pool} must be >= 1 (or null: test split from the content)")
        spec = PROCEDURAL_KINDS[kind]
        self.kind = kind
        self.classes, self.prompt, self.modality = tuple(spec.classes), spec.prompt, spec.modality
        self._normal_ids: Optional[list] = None

    def _load_source(self):
        """Content (+ test pool) (+ normal pool); ``official`` names the test pool as the test split."""
        from datamodules.procedural import render_normal_pool, render_procedural, render_test_pool

        images, masks, _meta = render_procedural(self.kind, self.n_procedural, self.image_size,
                                                 self.procedural_seed)
        ids = [f"{self.kind}_{i:05d}" for i in range(len(images))]
        official = None
        parts_i, parts_m = [images], [masks]
        if self.test_pool is not None:
            test_images, test_masks = render_test_pool(self.kind, int(self.test_pool), self.image_size)
            test_ids = [f"{self.kind}_test_{i:05d}" for i in range(len(test_images))]
            official = {"train": list(ids), "test": test_ids}
            parts_i.append(test_images)
            parts_m.append(test_masks)
            ids = ids + test_ids
        if self.n_normal > 0:
            try:
                normal = render_normal_pool(self.kind, self.n_normal, self.image_size, self.procedural_seed)
            except ValueError as err:
                raise DataError(str(err)) from err
            self._normal_ids = [f"{self.kind}_normal_{i:05d}" for i in range(len(normal))]
            parts_i.append(normal)
            parts_m.append(np.zeros(normal.shape[:3], np.uint8))
            ids = ids + self._normal_ids
        images, masks = (np.concatenate(p) if len(p) > 1 else p[0] for p in (parts_i, parts_m))
        # Stratify by lesion/normal so small pools keep both in every split.
        strata = [str(int(m.any())) for m in masks]
        return images, masks, ids, [None] * len(ids), strata, official

    def _fixed_normal_pool(self) -> Optional[list]:
        return self._normal_ids
