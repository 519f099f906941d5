"""Layouts (how a dataset lies on disk): finding image–mask pairs, reading and checking them.

A layout only finds pairs and turns raw mask values into class indices; every reader here names the
file it could not use and what to do.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from datamodules.errors import DataError

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


def stem_id(path: Path) -> str:
    """A file's stem in Unicode NFC form: macOS writes names decomposed (NFD), so an image and
    its mask copied from different machines can differ only in normalisation."""
    return unicodedata.normalize("NFC", path.stem)


def report(problems: Optional[list], message: str) -> None:
    """Raise ``DataError(message)``, or append it to ``problems`` when collecting (inspect)."""
    if problems is None:
        raise DataError(message)
    problems.append(message)


def unreadable(path: Path, err: Optional[OSError] = None) -> DataError:
    """The error for a file or folder the user may not read (``err``: the PermissionError)."""
    where = getattr(err, "filename", None) or path
    return DataError(f"cannot read {where}: permission denied; make the dataset readable by you "
                     f"(e.g. chmod -R u+rX on its folder, or ask its owner) or copy it to a folder "
                     f"you can read")


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()  # decode now: truncated files fail here, not later in a worker
        return im
    except PermissionError as e:
        raise unreadable(path, e) from e
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
    group_kind: Optional[str] = None  # what a leakage group is ("video sequence"), if any
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
    def find(self, root: Path, problems: Optional[list] = None) -> list:
        """``discover`` with an unreadable root or subfolder reported as a DataError."""
        self.require_dir(root)
        try:
            return self.discover(root, problems)
        except PermissionError as e:
            raise unreadable(root, e) from e

    def require_dir(self, root: Path, *candidates: str) -> Path:
        """First existing ``root/candidate`` folder, else a DataError naming the layout.

        With no candidates, only checks that ``root`` is a folder the user may read.
        """
        try:
            is_dir = root.is_dir()
        except PermissionError as e:  # a parent folder we may not enter
            raise unreadable(root, e) from e
        if is_dir and not os.access(root, os.R_OK | os.X_OK):
            raise unreadable(root)
        if not candidates and is_dir:
            return root
        if not is_dir:
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
    try:
        files = [p for p in folder.iterdir()
                 if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")]
    except PermissionError as e:
        raise unreadable(folder, e) from e
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
        key = stem_id(p)
        if key in images:
            report(problems, f"two images share id {key!r}: {images[key]} and {p}; keep one")
        images[key] = p
    masks: dict = {}
    for p in list_files(mask_dir, mask_exts):
        key = mask_id(stem_id(p))
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


