"""The shared ``SegmentationDataModule``: decoding, resizing, the disk cache, splits and transforms.

Layouts and pair readers live in :mod:`datamodules.pairs`, split logic in :mod:`datamodules.splits`;
their public names are re-exported here for the dataset modules.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, Dataset  # noqa: E402

from datamodules.checks import mask_summary, raise_first, split_problems  # noqa: E402
from datamodules.budget import pick_normal_pool  # noqa: E402
from datamodules.errors import DataError  # noqa: E402
from datamodules.io import atomic_write, atomic_write_text  # noqa: E402
from datamodules.pairs import Layout, PairRecord, load_pair, natural_key  # noqa: E402
from datamodules.splits import make_splits, official_parts, read_split_file  # noqa: E402
from datamodules.transforms import build_transforms, reseed_in_worker  # noqa: E402


class SegmentationDataset(Dataset):
    """Samples ``{"image": float32 (3,S,S) in [0,1], "mask": int64 (S,S), "id": str}``.

    Args:
        images: uint8 (N,S,S,3).
        masks: uint8 (N,S,S) class indices.
        ids: N sample ids.
        indices: Which of the N samples this dataset serves.
        transform: Optional albumentations pipeline applied to image and mask jointly.
    """

    def __init__(self, images, masks, ids, indices, transform=None):
        self.images, self.masks, self.ids = images, masks, ids
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = self.indices[i]
        image, mask = self.images[j], self.masks[j]
        if self.transform is not None:
            reseed_in_worker(self.transform)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return {"image": image, "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(),
                "id": self.ids[j]}


class SegmentationDataModule(L.LightningDataModule):
    """Images, masks, seeded splits and loaders of one segmentation dataset.

    Args:
        layout: The dataset's on-disk layout (``None`` for subclasses that make data in memory).
        root: Folder in the layout's published form.
        image_size: Side S every image/mask is resized to (bilinear images, nearest masks).
        n_real: Size of the seeded few-shot subset ``train_few`` of train; ``None`` = all.
        split_seed: Seeds the split and the few-shot subset.
        val_fraction, test_fraction: Used where the dataset has no official split.
        batch_size, num_workers: DataLoader settings.
        cache_dir: Where decoded, resized arrays are cached as one ``.npz`` (``None``: no cache).
        transforms: Training augmentation preset, ``"standard"`` or ``"none"``.
        small_lesion_area: Lesion fraction under which a lesion counts as small (for metrics).
        split_file: JSON split to use when it exists (as written by ``write_split``).
        n_procedural, procedural_seed, test_pool: Accepted for config compatibility; used by
            procedural data (``test_pool`` set for a file-based dataset is an error).
        n_val: The label budget (:mod:`datamodules.budget`): validation pairs taken out of
            ``n_real`` (a count, or a share of ``n_real``); ``None``: a validation split of its own.
        n_normal: Size of the pool of lesion-free source images outside the budget (no masks
            used), ``split_indices["normal"]``; 0: none.
    """

    def __init__(self, layout: Optional[Layout] = None, root: Optional[str] = None,
                 image_size: int = 64, n_real: Optional[int] = 16, split_seed: int = 0,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, batch_size: int = 8,
                 num_workers: int = 0, cache_dir: Optional[str] = "outputs/cache",
                 transforms: str = "standard", small_lesion_area: float = 0.02,
                 split_file: Optional[str] = None, n_procedural: int = 400,
                 procedural_seed: int = 0, test_pool: Optional[int] = None,
                 n_val: Optional[float] = None, n_normal: int = 0):
        super().__init__()
        self.layout = layout
        self.root = Path(root).expanduser() if root is not None else None
        self.image_size, self.n_real, self.split_seed = int(image_size), n_real, int(split_seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.transforms, self.small_lesion_area = transforms, float(small_lesion_area)
        self.split_file = Path(split_file) if split_file else None
        self.n_procedural, self.procedural_seed = int(n_procedural), int(procedural_seed)
        self.test_pool, self.n_val, self.n_normal = test_pool, n_val, int(n_normal)
        if test_pool is not None and layout is not None:
            raise DataError(f"data.test_pool is for procedural datasets (a fixed rendered test pool); "
                            f"{layout.name} has its own test split: remove data.test_pool")
        if layout is not None:
            self.classes: tuple[str, ...] = tuple(layout.classes)
            self.prompt, self.modality = layout.prompt, layout.modality
        self.extra_train: Optional[Dataset] = None  # synthetic pairs, set by augmented.py
        self.cache_path: Optional[Path] = None
        self._ready = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ------------------------------------------------------------------ loading
    def _load_source(self):
        """Return ``(images (N,S,S,3), masks (N,S,S), ids, groups, strata, official)``."""
        if self.root is None:
            raise DataError(f"dataset {self.layout.name!r} needs data.root: the folder holding "
                            f"{self.layout.expected}")
        records = sorted(self.layout.find(self.root), key=lambda r: natural_key(r.id))
        official = self.layout.official_split(self.root, records)
        images, masks = self._load_cached(records)
        return (images, masks, [r.id for r in records], [r.group for r in records],
                [r.stratum for r in records], official)

    def _cache_key(self, records: Sequence[PairRecord]) -> str:
        files = sorted({p for r in records for p in (r.image_path, *r.mask_paths)})
        stats = [(str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p),
                  p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        blob = json.dumps([self.layout.name, self.layout.version, self.image_size,
                           [r.id for r in records], stats])
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _load_cached(self, records: Sequence[PairRecord]):
        if self.cache_dir is not None:
            self.cache_path = (self.cache_dir /
                               f"{self.layout.name}-{self.image_size}-{self._cache_key(records)}.npz")
            if self.cache_path.exists():
                try:
                    with np.load(self.cache_path) as z:
                        if list(z["ids"]) == [r.id for r in records]:
                            return z["images"], z["masks"]
                except (OSError, ValueError, KeyError):
                    pass  # a foreign or damaged cache file: decode again and overwrite it
        n, s = len(records), self.image_size
        images = np.empty((n, s, s, 3), np.uint8)
        masks = np.empty((n, s, s), np.uint8)
        for i, rec in enumerate(records):
            images[i], masks[i] = load_pair(self.layout, rec, s)
        if self.cache_path is not None:
            ids = np.array([r.id for r in records])
            # a cache, rebuilt from the files if lost: no fsync (it can be hundreds of MB)
            atomic_write(self.cache_path, lambda f: np.savez(f, images=images, masks=masks, ids=ids), fsync=False)
        return images, masks

    def setup(self, stage: Optional[str] = None) -> None:
        """Load (or read from cache) all pairs and compute the splits; idempotent."""
        if self._ready:
            return
        images, masks, ids, groups, strata, official = self._load_source()
        if len(ids) == 0:
            raise DataError(f"no image–mask pairs found under {self.root}")
        if self.layout is not None:
            self.classes = tuple(self.layout.classes_for(int(masks.max())))
        if int(masks.max()) >= len(self.classes):
            raise DataError(f"masks under {self.root} hold class index {int(masks.max())} but "
                            f"the dataset has classes {self.classes}: pass matching classes")
        self.images, self.masks, self.ids = images, masks, list(ids)
        from_file = self.split_file is not None and self.split_file.exists()
        fixed_normal = self._fixed_normal_pool()  # procedural: rendered lesion-free, outside the splits
        lesion = dict(zip(self.ids, mask_summary(self.masks, len(self.classes))[0].tolist()))
        if from_file:
            names = read_split_file(self.split_file, self.ids)
        else:
            keep = [k for k, i in enumerate(self.ids) if i not in set(fixed_normal or ())]
            names = make_splits([self.ids[k] for k in keep], [groups[k] for k in keep],
                                [strata[k] for k in keep], official, self.split_seed,
                                self.val_fraction, self.test_fraction, self.n_real,
                                n_val=self.n_val, lesion=lesion)
        if self.n_normal > 0 and "normal" not in names:
            names["normal"] = fixed_normal if fixed_normal is not None else pick_normal_pool(
                sorted(set(names["train"]) - set(names["train_few"])), lesion, self.n_normal,
                self.split_seed, self._dataset_name())
        self._check(names, groups, official_parts(official), from_file)
        pos = {k: i for i, k in enumerate(self.ids)}
        self.split_ids = names
        self.split_indices = {k: [pos[i] for i in v] for k, v in names.items()}
        self._ready = True

    def _fixed_normal_pool(self) -> Optional[list]:
        """Ids of images made lesion-free for the normal pool (kept out of every split), or None."""
        return None

    def _dataset_name(self) -> str:
        return f"{self.layout.name} at {self.root}" if self.layout is not None else str(getattr(self, "kind", ""))

    def _check(self, names: dict, groups: Sequence, official: set, from_file: bool) -> None:
        """Refuse data that would give a meaningless run (the checks of ``data inspect``)."""
        lesion, present = mask_summary(self.masks, len(self.classes))
        if self.layout is None:
            dataset, hint, kind = f"procedural_{getattr(self, 'kind', '')}", "", None
        else:
            dataset, kind = f"{self.layout.name} at {self.root}", self.layout.group_kind
            hint = (f"; `meddiffaug data inspect --dataset {self.layout.name} --root {self.root}` "
                    f"lists them")
        raise_first(split_problems(
            names, dict(zip(self.ids, lesion.tolist())), present, self.classes,
            dict(zip(self.ids, groups)), dataset, kind, official,
            str(self.split_file) if from_file else None, self.n_real), hint)

    # ------------------------------------------------------------------ splits & loaders
    def write_split(self, path) -> Path:
        """Write ``{"train", "train_few", "val", "test"[, "normal"]}`` id lists as JSON, atomically."""
        self.setup()
        path = Path(path)
        return atomic_write_text(path, json.dumps(self.split_ids, indent=1))

    def dataset(self, split: str, train_transforms: bool = False) -> SegmentationDataset:
        """Torch dataset of one split (``train``, ``train_few``, ``val`` or ``test``)."""
        self.setup()
        if split not in self.split_indices:
            raise KeyError(f"unknown split {split!r}; use one of {sorted(self.split_indices)}")
        tf = build_transforms(self.transforms, seed=self.split_seed) if train_transforms else None
        return SegmentationDataset(self.images, self.masks, self.ids,
                                   self.split_indices[split], tf)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        ds: Dataset = self.dataset("train_few", train_transforms=True)
        if self.extra_train is not None:
            ds = ConcatDataset([ds, self.extra_train])
        return self._loader(ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), shuffle=False)

