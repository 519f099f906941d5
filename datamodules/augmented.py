"""The segment stage's training set: real ``train_few`` plus accepted synthetic pairs at a ratio."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch.utils.data import ConcatDataset, Dataset

from datamodules.base import SegmentationDataset
from datamodules.transforms import build_transforms
from datamodules.errors import DataError
from datamodules.synthetic import SyntheticPairs, synthetic_subset


def synthetic_dataset(datamodule: Any, validate_dir: Path, ratio: float, seed: int,
                      transforms: str = "standard") -> Optional[Dataset]:
    """The accepted synthetic pairs the segmenter trains on beside ``train_few``.

    ``round(ratio * len(train_few))`` pairs are drawn by ``seed`` from the validate stage's
    ``accepted.jsonl``, with the training transforms ``transforms``, so the methods differ only in
    where the extra pairs come from.

    Args:
        datamodule: the set-up real datamodule (``split_indices``, ``image_size``).
        validate_dir: finished validate-stage folder.
        ratio: synthetic pairs per real ``train_few`` pair (``augment.ratio``).
        seed: draws the subset (``augment.seed``).
        transforms: albumentations preset of the synthetic pairs.

    Returns:
        A Dataset of ``{"image": (3,S,S), "mask": (S,S), "id"}`` or None when ratio is 0.
    """
    manifest = Path(validate_dir) / "accepted.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing: the validate stage in {validate_dir} did not finish. "
                        f"Rerun with --force validate.")
    pairs = SyntheticPairs(manifest, datamodule.image_size, transforms=build_transforms(transforms, seed=seed + 1))
    n_real = len(datamodule.split_indices["train_few"])
    return synthetic_subset(pairs if len(pairs) else None, n_real, ratio, seed)


def training_set(datamodule: Any, transforms: str, validate_dir: Optional[Path] = None, ratio: float = 0.0,
                 seed: int = 0, synthetic_transforms: str = "standard", include_real: bool = True) -> Dataset:
    """A fresh training Dataset: ``train_few`` under ``transforms`` (+ synthetic pairs); the datamodule is only read.

    Args:
        datamodule: the real datamodule (set up here if needed).
        transforms: albumentations preset of the real pairs (``standard`` | ``none``).
        validate_dir: finished validate-stage folder whose accepted pairs are mixed in, or None.
        ratio, seed, synthetic_transforms: see :func:`synthetic_dataset`; ``seed`` also seeds the
            real pairs' augmentations (the synthetic pairs' use ``seed + 1``).
        include_real: False trains on the synthetic pairs alone (``augment.synthetic_only``): the same
            ``round(ratio * len(train_few))`` pairs the augmented run adds, and no real pair.

    Raises:
        DataError: ``include_real`` is False and there is no synthetic pair to train on.
    """
    datamodule.setup()
    real = SegmentationDataset(datamodule.images, datamodule.masks, datamodule.ids,
                               datamodule.split_indices["train_few"], build_transforms(transforms, seed=seed))
    extra = None if validate_dir is None else synthetic_dataset(datamodule, validate_dir, ratio, seed,
                                                                synthetic_transforms)
    if not include_real:
        if extra is None:
            raise DataError(f"augment.synthetic_only needs synthetic pairs, but {validate_dir} accepted none "
                            f"(or augment.ratio is 0): loosen the gate or raise augment.ratio")
        return extra
    return real if extra is None else ConcatDataset([real, extra])
