"""REFUGE / REFUGE2 fundus images with optic disc and cup masks (BMP, 0/128/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from datamodules import register_dataset
from datamodules.pairs import Layout, pair_by_stem
from datamodules.errors import DataError

# (split, image folder candidates, mask folder candidates); only the training set is required.
SETS = (
    ("train", ("Training400", "REFUGE-Training400"),
     ("Annotation-Training400/Disc_Cup_Masks", "REFUGE-Training400-GT/Disc_Cup_Masks")),
    ("val", ("Validation400", "REFUGE-Validation400"),
     ("Annotation-Validation400/Disc_Cup_Masks", "REFUGE-Validation400-GT/Disc_Cup_Masks")),
    ("test", ("Test400", "REFUGE-Test400"),
     ("Annotation-Test400/Disc_Cup_Masks", "REFUGE-Test-GT/Disc_Cup_Masks",
      "REFUGE-Test400-GT/Disc_Cup_Masks")),
)

# Raw grey value -> class via a lookup table (an in-place chain of remaps would merge classes:
# 0->2 then 2->... ). 255 = background, 128 = disc rim -> disc, 0 = cup (which lies in the disc).
_LUT = np.full(256, 255, np.uint8)
_LUT[255], _LUT[128], _LUT[0] = 0, 1, 2


@register_dataset("refuge2")
class Refuge2(Layout):
    """REFUGE challenge layout: ``Training400/{Glaucoma,Non-Glaucoma}/<id>.jpg`` with
    ``Annotation-Training400/Disc_Cup_Masks/<same>/<id>.bmp``; validation/test sets alike are
    used as the official val/test when present. Stratum = Glaucoma / Non-Glaucoma.
    """

    name = "refuge2"
    classes = ("background", "optic_disc", "optic_cup")
    prompt = "a color fundus photograph of the optic disc and cup"
    modality = "fundus"
    expected = ("Training400/{Glaucoma,Non-Glaucoma}/<id>.jpg + "
                "Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/<id>.bmp")

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        records = []
        for split, img_cands, mask_cands in SETS:
            present = [c for c in img_cands if (root / c).is_dir()]
            if split != "train" and not present:
                continue  # optional official val/test sets
            img_dir = self.require_dir(root, *img_cands)
            mask_dir = self.require_dir(root, *mask_cands)
            subdirs = sorted(p for p in img_dir.iterdir() if p.is_dir())
            for sub in subdirs or [img_dir]:
                msub = mask_dir / sub.name if sub is not img_dir else mask_dir
                if not msub.is_dir():
                    # Some releases keep all masks of a set in one folder.
                    msub = mask_dir
                stratum = sub.name if sub is not img_dir else None
                records += pair_by_stem(sub, msub, problems, image_exts=(".jpg", ".jpeg", ".png"),
                                        mask_exts=(".bmp", ".png"), stratum=stratum, split=split)
        if not records:
            raise DataError(f"no images found under {root}; expected {self.expected}")
        return records

    def official_split(self, root, records):
        out = super().official_split(root, records)
        # Only the training set present: no official split, split it by seed instead.
        return out if out and len(out) > 1 else None

    def remap(self, raw: np.ndarray, path: Path) -> np.ndarray:
        vals = np.unique(raw)
        bad = [int(v) for v in vals if v not in (0, 128, 255)]
        if bad:
            raise DataError(f"REFUGE mask {path} holds values {sorted(int(v) for v in vals)[:12]}; "
                            f"only 0 (cup), 128 (disc rim) and 255 (background) are valid "
                            f"(unexpected: {bad[:12]}): use the original lossless BMP masks")
        return _LUT[raw]
