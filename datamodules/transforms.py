"""Training augmentations (albumentations), seeded so a run's augmentations are reproducible."""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import otherwise phones home

from typing import Any, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.errors import DataError  # noqa: E402


def build_transforms(preset: str, seed: Optional[int] = None):
    """Albumentations pipeline applied jointly to image and mask.

    Args:
        preset: ``"standard"`` (flips, 90° rotations, small affine, mild colour jitter) or
            ``"none"``.
        seed: seeds the pipeline's own random stream (albumentations ignores the global seeds, so
            without it every run draws different augmentations); DataLoader workers each derive
            their own stream from it (:func:`reseed_in_worker`).

    Returns:
        An ``albumentations.Compose`` or ``None``.
    """
    if preset in (None, "none"):
        return None
    if preset != "standard":
        raise DataError(f"unknown transforms preset {preset!r}: use 'standard' or 'none'")
    import albumentations as A

    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        # Small geometric jitter only: lesions near the border must stay in view; masks use
        # nearest interpolation (albumentations' default for masks) so labels stay indices.
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-15, 15), p=0.5),
        A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5),
    ], seed=seed)


def reseed_in_worker(transform: Any) -> None:
    """Give each DataLoader worker its own augmentation stream, derived from the pipeline's seed.

    Workers receive copies of one seeded pipeline, which would otherwise repeat the same draws.
    A no-op in the main process and for unseeded pipelines.
    """
    info = torch.utils.data.get_worker_info()
    seed = getattr(transform, "seed", None)
    if info is None or seed is None or getattr(transform, "worker_id", None) == info.id:
        return
    transform.set_random_seed(int(np.random.SeedSequence([seed, info.id]).generate_state(1)[0]))
    transform.worker_id = info.id
