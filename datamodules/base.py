"""Layouts (how a dataset lies on disk) and the shared ``SegmentationDataModule``.

A layout only finds image–mask pairs and turns raw mask values into class indices; decoding,
resizing, the disk cache, leakage-aware seeded splits and transforms live here once.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import ConcatDataset, DataLoader, Dataset  # noqa: E402

from datamodules.errors import DataError  # noqa: E402

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class PairRecord:
    """One image with its mask file(s).

    Attributes:
        id: Unique sample id (file stem).
        image_path: The image file.
        mask_paths: Mask files; several are united (BUSI); empty = all-background mask.
        group: Leakage group (e.g. video sequence): a group never straddles splits.
        stratum: Kept in proportion across splits (e.g. benign/malignant/normal).
        split: Official split this file belongs to (from its folder), if any.
    """

    id: str
    image_path: Path
    mask_paths: list = field(default_factory=list)
    group: Optional[str] = None
    stratum: Optional[str] = None
    split: Optional[str] = None


def natural_key(s: str) -> list:
    """Sort key that orders ``"2" < "10"`` (numeric chunks compare as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t]


def report(problems: Optional[list], message: str) -> None:
    """Raise ``DataError(message)``, or append it to ``problems`` when collecting (inspect)."""
    if problems is None:
        raise DataError(message)
    problems.append(message)


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now: truncated files fail here, not later in a worker
        return im
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or "
                        f"not an image: re-download or delete it (and its pair)") from e


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 (H,W,3) RGB."""
    return np.asarray(_open(path).convert("RGB"))


def read_raw_mask(path: Path) -> np.ndarray:
    """Decode a mask file to its raw single-channel values, uint8 (H,W).

    Grey palettes (REFUGE BMPs, black/white PNGs) map to their grey values; colour palettes keep
    their indices (VOC-style class masks); RGB masks average their channels.
    """
    im = _open(path)
    if im.mode == "P":
        idx = np.asarray(im)
        pal = np.asarray(im.getpalette() or [], np.uint8).reshape(-1, 3)
        used = np.unique(idx)
        if len(pal) > used.max() and (pal[used] == pal[used][:, :1]).all():
            return pal[idx, 0]
        return idx
    if im.mode in ("I", "I;16", "I;16B", "F"):
        arr = np.asarray(im)
        if arr.max() > 255 or arr.min() < 0:
            raise DataError(f"mask {path} has values up to {arr.max()}: expected 8-bit labels; "
                            f"re-export it as 8-bit PNG")
        return arr.astype(np.uint8)
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB")).mean(-1).round().astype(np.uint8)


def binary_from_raw(raw: np.ndarray, path: Path, lossy: bool = False) -> np.ndarray:
    """Raw mask values -> {0,1}. Lossy (JPEG) masks are thresholded at 127; others must be exact."""
    if lossy:
        return (raw > 127).astype(np.uint8)
    vals = set(np.unique(raw).tolist())
    if vals <= {0, 255}:
        return (raw // 255).astype(np.uint8)
    if vals <= {0, 1}:
        return raw.astype(np.uint8)
    shown = sorted(vals)[:12]
    raise DataError(f"mask {path} should be binary (values 0/255 or 0/1) but holds values "
                    f"{shown}{' ...' if len(vals) > 12 else ''}: re-export it as a binary PNG")


class Layout:
    """How one dataset lies on disk. Subclasses set the class attributes and ``discover``."""

    name = "layout"
    version = 1  # bump when decoding changes: it is part of the cache key
    classes: tuple = ("background", "lesion")
    prompt = ""
    modality = ""
    expected = ""  # human-readable expected folder structure, quoted in errors
    lossy_masks = False

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        """List the image–mask pairs under ``root`` as ``PairRecord``s (no decoding)."""
        raise NotImplementedError

    def official_split(self, root: Path, records: Sequence[PairRecord]) -> Optional[dict]:
        """Official ``{split: [ids]}`` (e.g. from folders), or ``None``."""
        out: dict = {}
        for r in records:
            if r.split:
                out.setdefault(r.split, []).append(r.id)
        return out or None

    def remap(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw mask values uint8 (H,W) -> class indices uint8 (H,W)."""
        return binary_from_raw(raw, path, self.lossy_masks)

    def read_mask(self, record: PairRecord, image_hw: Optional[tuple] = None) -> np.ndarray:
        """Class indices uint8 (H,W): union of the record's masks, checked against ``image_hw``."""
        out = None
        for p in record.mask_paths:
            m = self.remap(read_raw_mask(p), p)
            if image_hw is not None and m.shape != tuple(image_hw):
                raise DataError(f"mask {p} is {m.shape[1]}x{m.shape[0]} but its image "
                                f"{record.image_path} is {image_hw[1]}x{image_hw[0]}: a mask must "
                                f"match its image's size; fix or remove the pair")
            out = m if out is None else np.maximum(out, m)
        return out if out is not None else np.zeros(image_hw, np.uint8)

    def classes_for(self, max_index: int) -> tuple:
        """Class names given the largest class index found (only ``folder`` infers them)."""
        return tuple(self.classes)

    # -- helpers for subclasses
    def require_dir(self, root: Path, *candidates: str) -> Path:
        """First existing ``root/candidate`` folder, else a DataError naming the layout."""
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder; expected the "
                            f"{self.name} layout: {self.expected}")
        for c in candidates:
            if (root / c).is_dir():
                return root / c
        raise DataError(f"{root} is not in the {self.name} layout: expected folder(s) "
                        f"{' or '.join(repr(c) for c in candidates)} ({self.expected}); "
                        f"point data.root at the folder that contains them")


def list_files(folder: Path, exts: Sequence[str] = IMAGE_EXTS) -> list:
    """Files in ``folder`` with one of ``exts`` (hidden files skipped), natural order."""
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def pair_by_stem(image_dir: Path, mask_dir: Path, problems: Optional[list] = None,
                 image_exts=IMAGE_EXTS, mask_exts=IMAGE_EXTS, mask_id=lambda stem: stem,
                 **record_kw) -> list:
    """Match images and masks by id; report images without mask and masks without image.

    Args:
        mask_id: Maps a mask file stem to its image id, or ``None`` if the file is not a mask.
        **record_kw: Extra ``PairRecord`` fields (group, stratum, split) for every pair.
    """
    images: dict = {}
    for p in list_files(image_dir, image_exts):
        if p.stem in images:
            report(problems, f"two images share id {p.stem!r}: {images[p.stem]} and {p}; keep one")
        images[p.stem] = p
    masks: dict = {}
    for p in list_files(mask_dir, mask_exts):
        key = mask_id(p.stem)
        if key is not None:
            masks[key] = p
    out = []
    for key, img in images.items():
        if key not in masks:
            report(problems, f"image {img} has no mask in {mask_dir}: add its mask or remove "
                             f"the image")
            continue
        out.append(PairRecord(key, img, [masks[key]], **record_kw))
    for key in masks.keys() - images.keys():
        report(problems, f"mask {masks[key]} has no image in {image_dir}: add the image or "
                         f"remove the mask")
    return out


def load_pair(layout: Layout, record: PairRecord, size: Optional[int] = None):
    """Decode one pair; sizes are checked before resizing.

    Returns:
        ``(image uint8 (S,S,3), mask uint8 (S,S))`` (original (H,W) when ``size`` is None).
    """
    image = read_image(record.image_path)
    mask = layout.read_mask(record, image.shape[:2])
    if size is None:
        return image, mask
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return image, mask


# ---------------------------------------------------------------------- splits
def _take_groups(ids, groups, strata, fractions, rng) -> list:
    """Split ``ids`` into ``len(fractions)+1`` parts by whole groups, stratified.

    Groups are shuffled within their stratum and interleaved by relative rank, so any prefix of
    the order holds the strata in proportion; parts take prefixes until they reach
    ``round(fraction * len(ids))`` (at least 1) ids. The last part (train) keeps >= 1 group.
    """
    members: dict = {}
    g_stratum: dict = {}
    for i, g, s in zip(ids, groups, strata):
        g = i if g is None else g
        members.setdefault(g, []).append(i)
        g_stratum.setdefault(g, "" if s is None else s)
    by_s: dict = {}
    for g in sorted(members, key=natural_key):
        by_s.setdefault(g_stratum[g], []).append(g)
    pos = []
    for s in sorted(by_s, key=natural_key):
        gs = by_s[s]
        for rank, k in enumerate(rng.permutation(len(gs))):
            pos.append(((rank + rng.random()) / len(gs), gs[k]))
    order = [g for _, g in sorted(pos, key=lambda t: t[0])]
    parts, n, start = [], len(ids), 0
    for frac in fractions:
        target = max(1, round(frac * n)) if frac > 0 else 0
        part: list = []
        while len(part) < target and start < len(order) - 1:
            part += members[order[start]]
            start += 1
        parts.append(part)
    parts.append([i for g in order[start:] for i in members[g]])
    return [sorted(p, key=natural_key) for p in parts]


def make_splits(ids, groups, strata, official, seed, val_fraction, test_fraction, n_real) -> dict:
    """Deterministic ``{"train", "train_few", "val", "test"}`` id lists.

    Official ``train``/``val``/``test`` are used as given; without ``val`` it is carved from the
    official train by seed; without an official test everything is split by group and stratum.
    ``train_few`` is a seeded prefix of a permutation of train (so smaller ``n_real`` subsets
    nest in larger ones) and never touches val/test.
    """
    rng = np.random.default_rng([int(seed), 0])
    gmap, smap = dict(zip(ids, groups)), dict(zip(ids, strata))
    official = dict(official or {})
    if "test" not in official and "val" in official:
        # An official train/val release without test labels: the official val is the held-out
        # set (never used for model selection), val is carved from train.
        official["test"] = official.pop("val")
    if "train" in official and "test" in official:
        train, test = list(official["train"]), list(official["test"])
        if "val" in official:
            val = list(official["val"])
        else:
            val, train = _take_groups(train, [gmap[i] for i in train], [smap[i] for i in train],
                                      [val_fraction], rng)
    else:
        test, val, train = _take_groups(ids, groups, strata, [test_fraction, val_fraction], rng)
    train, val, test = (sorted(x, key=natural_key) for x in (train, val, test))
    if n_real is None:
        few = list(train)
    else:
        if int(n_real) > len(train):
            raise DataError(f"n_real={n_real} exceeds the {len(train)} images of the train split; "
                            f"lower data.n_real or set it to null for all")
        perm = np.random.default_rng([int(seed), 1]).permutation(len(train))[: int(n_real)]
        few = sorted((train[k] for k in perm), key=natural_key)
    return {"train": train, "train_few": few, "val": val, "test": test}


def read_split_file(path: Path, ids: Sequence[str]) -> dict:
    """Read a split JSON written by ``write_split``; every id must exist and splits be disjoint."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read split file {path} ({e}): delete it to re-split") from e
    if not isinstance(data, dict) or not {"train", "val", "test"} <= set(data):
        raise DataError(f"split file {path} must hold lists 'train', 'val' and 'test'")
    data.setdefault("train_few", data["train"])
    known = set(ids)
    missing = sorted({i for k in ("train", "train_few", "val", "test") for i in data[k]} - known,
                     key=natural_key)
    if missing:
        raise DataError(f"split file {path} names ids not in the dataset: {missing[:10]}"
                        f"{' ...' if len(missing) > 10 else ''}; delete the file to re-split")
    tr, va, te = (set(data[k]) for k in ("train", "val", "test"))
    if (tr & va) or (tr & te) or (va & te) or not set(data["train_few"]) <= tr:
        raise DataError(f"split file {path} has overlapping splits (or train_few outside train)")
    return {k: list(data[k]) for k in ("train", "train_few", "val", "test")}

def _atomic_write_bytes(path: Path, write) -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # atomic on POSIX: readers never see half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_transforms(preset: str):
    """Albumentations pipeline applied jointly to image and mask.

    Args:
        preset: ``"standard"`` (flips, 90° rotations, small affine, mild colour jitter) or
            ``"none"``.

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
    ])


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
        n_procedural, procedural_seed: Accepted for config compatibility; used by procedural.
    """

    def __init__(self, layout: Optional[Layout] = None, root: Optional[str] = None,
                 image_size: int = 64, n_real: Optional[int] = 16, split_seed: int = 0,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, batch_size: int = 8,
                 num_workers: int = 0, cache_dir: Optional[str] = "outputs/cache",
                 transforms: str = "standard", small_lesion_area: float = 0.02,
                 split_file: Optional[str] = None, n_procedural: int = 400,
                 procedural_seed: int = 0):
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
        records = sorted(self.layout.discover(self.root), key=lambda r: natural_key(r.id))
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
            _atomic_write_bytes(self.cache_path,
                                lambda f: np.savez(f, images=images, masks=masks, ids=ids))
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
        if self.split_file is not None and self.split_file.exists():
            names = read_split_file(self.split_file, self.ids)
        else:
            names = make_splits(self.ids, groups, strata, official, self.split_seed,
                                self.val_fraction, self.test_fraction, self.n_real)
        pos = {k: i for i, k in enumerate(self.ids)}
        self.split_ids = names
        self.split_indices = {k: [pos[i] for i in v] for k, v in names.items()}
        self._ready = True

    # ------------------------------------------------------------------ splits & loaders
    def write_split(self, path) -> Path:
        """Write ``{"train", "train_few", "val", "test"}`` id lists as JSON, atomically."""
        self.setup()
        path = Path(path)
        text = json.dumps(self.split_ids, indent=1).encode()
        _atomic_write_bytes(path, lambda f: f.write(text))
        return path

    def dataset(self, split: str, train_transforms: bool = False) -> SegmentationDataset:
        """Torch dataset of one split (``train``, ``train_few``, ``val`` or ``test``)."""
        self.setup()
        if split not in self.split_indices:
            raise KeyError(f"unknown split {split!r}; use one of {sorted(self.split_indices)}")
        tf = build_transforms(self.transforms) if train_transforms else None
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


class ProceduralDataModule(SegmentationDataModule):
    """Embedded procedural data (``datamodules.procedural``), no files needed.

    Args:
        kind: ``polyp``, ``fundus``, ``skin`` or ``ultrasound``.
        **kwargs: As for ``SegmentationDataModule`` (``root`` is ignored; ``n_procedural`` and
            ``procedural_seed`` set the pool size and content).
    """

    def __init__(self, kind: str, **kwargs: Any):
        super().__init__(layout=None, **kwargs)
        from datamodules.procedural import PROCEDURAL_KINDS  # lazy: written concurrently

        if kind not in PROCEDURAL_KINDS:
            raise DataError(f"unknown procedural kind {kind!r}; use one of "
                            f"{sorted(PROCEDURAL_KINDS)}")
        spec = PROCEDURAL_KINDS[kind]
        self.kind = kind
        self.classes, self.prompt, self.modality = tuple(spec.classes), spec.prompt, spec.modality

    def _load_source(self):
        from datamodules.procedural import render_procedural

        images, masks, _meta = render_procedural(self.kind, self.n_procedural, self.image_size,
                                                 self.procedural_seed)
        ids = [f"{self.kind}_{i:05d}" for i in range(len(images))]
        # Stratify by lesion/normal so small pools keep both in every split.
        strata = [str(int(m.any())) for m in masks]
        return images, masks, ids, [None] * len(ids), strata, None
