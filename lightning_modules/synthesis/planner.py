"""Planning synthetic samples: source image, new mask and label of sample ``i`` (method-independent).

Sample ``i`` depends only on ``(seed, i)`` and the training data, so diffusion and the copy-paste
control plan identical sources, masks and labels and differ only in the pixels inside the new mask.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lightning_modules.synthesis.copy_paste import copy_paste, donor_mask
from lightning_modules.synthesis.masks import MaskGenerationError, MaskGenerator
from lightning_modules.synthesis.sources import make_source, source_order, source_pool, union_label

MAX_SOURCE_TRIES = 4  # primary source + alternates when the mask fits nowhere in the primary


def sample_seed(seed: int, i: int) -> int:
    """Independent, stable 32-bit seed of sample ``i`` (does not depend on n or batch size)."""
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0])


def sample_id(i: int) -> str:
    """Synthetic ids carry a prefix so they never collide with real ids in a mixed dataset."""
    return f"syn_{i:05d}"


class Planner:
    """Plans sample ``i``: source, new mask and label (method-independent).

    Args:
        images, masks, ids: Datamodule arrays, uint8 (N,S,S,3), uint8 (N,S,S), N ids.
        train_indices: ``train_few`` rows: the sources, mask shapes and donors.
        seed, n_samples, scale_range, elastic, mask_source, source: the generation settings.
        normal_indices: The normal pool's rows (``split_indices["normal"]``): with ``source`` =
            ``normal`` the sources come from it instead of ``train_indices`` (shapes and donors do not).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: list, train_indices: list, seed: int,
                 n_samples: int, scale_range: tuple, elastic: float, mask_source: str, source: str,
                 normal_indices: Optional[list] = None):
        self.images, self.masks, self.ids, self.seed = images, masks, ids, int(seed)
        self.train = [int(i) for i in train_indices]
        self.generator = MaskGenerator(masks[self.train], None, tuple(scale_range), float(elastic), str(mask_source))
        self.pool, self.kind = source_pool(masks, self.train, str(source), normal_indices)
        # One balanced source order for the whole run, from its own stream of the seed.
        order_rng = np.random.default_rng([self.seed, 0])
        self.order = source_order(self.pool, int(n_samples), order_rng)

    def plan(self, i: int) -> dict[str, Any]:
        """Returns a dict with ``id, sample_seed, source, new_mask, label, mask_params`` or
        ``{"id", "skip_reason"}`` when no source could host a mask."""
        s_seed = sample_seed(self.seed, i)
        rng = np.random.default_rng(s_seed)
        index, reasons = self.order[i], []
        for attempt in range(MAX_SOURCE_TRIES):
            src = make_source(self.images, self.masks, self.ids, index, self.kind)
            try:
                new, params = self.generator.sample(rng, src.occupied, fov=src.fov)
                if "source_mask_index" in params:  # the real sample the shape came from
                    params["shape_source_id"] = str(self.ids[self.train[params["source_mask_index"]]])
            except MaskGenerationError as e:
                reasons.append(f"{src.id}: {e}")
                index = int(self.pool[rng.integers(len(self.pool))])
                continue
            return {"id": sample_id(i), "index": i, "sample_seed": s_seed, "source": src,
                    "source_attempt": attempt, "new_mask": new, "label": union_label(src.existing, new),
                    "mask_params": params}
        return {"id": sample_id(i), "skip_reason": " | ".join(reasons)}


def copy_paste_batch(plans: list, images: np.ndarray, masks: np.ndarray, donors: list) -> tuple[list, list]:
    """The copy-paste control's pixels for planned samples: a random donor lesion, rotated, per plan.

    Returns:
        (uint8 (S,S,3) images, per-sample manifest extras ``donor_index, donor_component, paste_angle``).
    """
    outs, extra = [], []
    for p in plans:
        # Own stream per sample, drawn after nothing else: masks/sources stay method-independent.
        rng = np.random.default_rng([p["sample_seed"], 2])
        row, lab = donors[int(rng.integers(len(donors)))]
        angle = float(rng.uniform(0.0, 360.0))
        dmask = donor_mask(masks, row, lab)
        outs.append(copy_paste(p["source"].image, p["new_mask"], images[row], dmask, angle=angle,
                               occupied=p["source"].occupied))
        extra.append({"donor_index": row, "donor_component": lab, "paste_angle": angle})
    return outs, extra
