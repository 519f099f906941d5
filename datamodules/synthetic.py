"""Synthetic image–mask pairs (a generate or validate manifest) as a torch Dataset.

Samples look exactly like real ones (``SegmentationDataset``): ``{"image": float32 (3,S,S) in
[0,1], "mask": int64 (S,S), "id": str}``, so the segmenter cannot tell them apart by format.
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset, Subset  # noqa: E402

from datamodules.errors import DataError  # noqa: E402
from datamodules.io import read_image, read_manifest, read_mask, resolve  # noqa: E402
from datamodules.transforms import reseed_in_worker  # noqa: E402


class SyntheticPairs(Dataset):
    """Pairs listed in a ``.jsonl`` manifest (``generate/manifest.jsonl`` or ``validate/accepted.jsonl``).

    Args:
        manifest_path: JSONL with one object per sample holding ``image`` and ``mask`` paths
            (absolute, or relative to the manifest's folder) and ``id``.
        image_size: Side S every pair is resized to (images bilinear, masks nearest).
        transforms: Optional albumentations pipeline applied to (image uint8 (S,S,3), mask) jointly.

    Raises:
        DataError: the manifest is missing or malformed, a line lacks ``image``/``mask``, or a
            listed file does not exist (the message names it).
    """

    def __init__(self, manifest_path, image_size: int, transforms: Optional[Callable] = None):
        self.manifest_path = Path(manifest_path)
        self.image_size, self.transforms = int(image_size), transforms
        records = read_manifest(self.manifest_path, missing_ok=False)
        base = self.manifest_path.parent
        self.items: list[tuple[str, Path, Path]] = []
        for n, r in enumerate(records, start=1):
            if r.get("early_rejected"):  # stopped mid-sampling by the generate stage: no image
                continue
            if "image" not in r or "mask" not in r:
                raise DataError(f"{self.manifest_path}, record {n} has no 'image'/'mask' path; "
                                f"regenerate the manifest")
            img, msk = resolve(r["image"], base), resolve(r["mask"], base)
            for p in (img, msk):  # fail at construction, not in a worker mid-epoch
                if not p.is_file():
                    raise DataError(f"{p} (listed in {self.manifest_path}, record {n}) does not exist; "
                                    f"rerun the stage that wrote it or remove the line")
            self.items.append((str(r.get("id", img.stem)), img, msk))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Pair ``i`` as (uint8 (S,S,3), uint8 (S,S)) at ``image_size``."""
        _, img_path, mask_path = self.items[i]
        image, mask = read_image(img_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise DataError(f"{mask_path} has shape {mask.shape} but its image {img_path} has "
                            f"{image.shape[:2]}; regenerate the pair")
        S = self.image_size
        if image.shape[:2] != (S, S):
            image = np.array(Image.fromarray(image).resize((S, S), Image.BILINEAR))
            mask = np.array(Image.fromarray(mask).resize((S, S), Image.NEAREST))
        return image, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, mask = self.load(i)
        if self.transforms is not None:
            reseed_in_worker(self.transforms)
            out = self.transforms(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0,
                "mask": torch.from_numpy(np.ascontiguousarray(mask)).long(), "id": self.items[i][0]}


def synthetic_subset(synthetic_dataset: Optional[Dataset], n_real: int, ratio: float, seed: int) -> Optional[Dataset]:
    """The ``round(ratio * n_real)`` synthetic samples drawn by ``seed`` (None when there are none).

    Draws without replacement when the synthetic pool is large enough, else with replacement
    (the ratio is what the experiment sweeps, so it is honoured even for a small accepted set).
    Suits ``SegmentationDataModule.extra_train``, which is concatenated to ``train_few``.
    """
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    k = int(round(ratio * n_real))
    if k == 0:
        return None
    if synthetic_dataset is None or len(synthetic_dataset) == 0:
        warnings.warn(f"ratio {ratio} asks for {k} synthetic samples but none were accepted; "
                      f"training on real data only", RuntimeWarning, stacklevel=2)
        return None
    n = len(synthetic_dataset)
    idx = np.random.default_rng(seed).choice(n, size=k, replace=k > n)
    return Subset(synthetic_dataset, [int(i) for i in idx])


def mix_real_and_synthetic(real_dataset: Dataset, synthetic_dataset: Optional[Dataset], ratio: float,
                           seed: int) -> Dataset:
    """Real set plus ``round(ratio * len(real))`` synthetic samples drawn by ``seed``.

    Args:
        real_dataset: The real training set (``train_few``).
        synthetic_dataset: Accepted synthetic pairs, or None.
        ratio: Synthetic : real; 0 (or no synthetic pair) returns ``real_dataset`` itself.
        seed: Seeds the draw (see :func:`synthetic_subset`).

    Returns:
        ``real_dataset`` or a ``ConcatDataset([real, Subset(synthetic, drawn)])``.
    """
    extra = synthetic_subset(synthetic_dataset, len(real_dataset), ratio, seed)
    return real_dataset if extra is None else ConcatDataset([real_dataset, extra])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


@dataclass
class GeneratedSamples:
    """A generate folder's finished samples (``rows``) and its early-rejected rows (``early``).

    Views read from disk a few rows at a time (:class:`~datamodules.rows.LazyRows`), resized to the
    stage's size: ``images`` (N,3,S,S) float in [0,1], ``masks`` (N,S,S) int64 labels, ``cond_masks``
    (N,S,S) int64: the region generation inpainted (``new_mask``; the label for folders without one): a
    gate conditions on it as generation did, and outside it a generated image equals its source.
    ``raw_mask(k)``: row k's label array as stored, (H,W) uint8.
    """

    rows: list
    images: Any
    masks: Any
    cond_masks: Any
    early: list
    folder: Optional[Path] = None

    def raw_mask(self, k: int) -> np.ndarray:
        """Row ``k``'s label as stored (H,W) uint8."""
        return read_mask(self.folder / self.rows[k]["mask"])


def _resized(arrays: list, size: Optional[int], images: bool) -> torch.Tensor:
    """uint8 (H,W,3) images -> float (B,3,S,S) bilinear, or (H,W) masks -> int64 (B,S,S) nearest."""
    import torch.nn.functional as F

    x = to_tensor(np.stack(arrays)) if images else torch.from_numpy(np.stack(arrays).astype(np.int64))
    if size is None or x.shape[-1] == size:
        return x
    if images:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return F.interpolate(x[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def load_generated(gen_dir: Path, size: Optional[int] = None) -> GeneratedSamples:
    """The generate folder's finished samples as views resized to ``size``, and its early-rejected rows.

    Nothing is read here but the manifest: each view reads the files of the rows it is indexed with.
    """
    from datamodules.rows import LazyRows

    gen_dir = Path(gen_dir)
    all_rows = read_manifest(gen_dir / "manifest.jsonl", missing_ok=False)
    rows = [r for r in all_rows if not r.get("early_rejected")]
    early = [r for r in all_rows if r.get("early_rejected")]
    s = size or 1
    if not rows:
        empty = torch.zeros(0, s, s, dtype=torch.long)
        return GeneratedSamples(rows, torch.zeros(0, 3, s, s), empty, empty.clone(), early, gen_dir)

    def files(key: str, fallback: str = ""):
        return [gen_dir / (r.get(key) or r[fallback]) for r in rows]

    def view(paths: list, images: bool):
        read = read_image if images else read_mask
        return LazyRows(lambda pos: _resized([read(paths[k]) for k in pos], size, images), n=len(rows))

    return GeneratedSamples(rows, view(files("image"), True), view(files("mask"), False),
                            view(files("new_mask", "mask"), False), early, gen_dir)
