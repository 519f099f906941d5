"""Real + synthetic mixing policy of the segment stage (``augment.method``, ``augment.ratio``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig
from torch.utils.data import Dataset

from datamodules.base import build_transforms
from datamodules.errors import DataError
from datamodules.synthetic import SyntheticPairs, synthetic_subset


def synthetic_dataset(cfg: DictConfig, datamodule: Any, validate_dir: Path) -> Optional[Dataset]:
    """The accepted synthetic pairs the segmenter trains on beside ``train_few``.

    ``round(augment.ratio * len(train_few))`` pairs are drawn by ``augment.seed`` from the
    validate stage's ``accepted.jsonl``, with the same training transforms as the real pairs, so
    the methods differ only in where the extra pairs come from.

    Args:
        cfg: resolved config (``augment``, ``data.transforms``, ``data.image_size``).
        datamodule: the set-up real datamodule.
        validate_dir: finished validate-stage folder.

    Returns:
        A Dataset of ``{"image": (3,S,S), "mask": (S,S), "id"}`` or None when ratio is 0.
    """
    manifest = Path(validate_dir) / "accepted.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing: the validate stage in {validate_dir} did not finish. "
                        f"Rerun with --force validate.")
    pairs = SyntheticPairs(manifest, cfg.data.image_size, transforms=build_transforms(cfg.data.transforms))
    n_real = len(datamodule.split_indices["train_few"])
    return synthetic_subset(pairs if len(pairs) else None, n_real, cfg.augment.ratio, cfg.augment.seed)
