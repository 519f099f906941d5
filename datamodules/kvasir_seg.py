"""Kvasir-SEG: ``images/<id>.jpg`` + ``masks/<id>.jpg`` (lossy JPEG masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from datamodules import register_dataset
from datamodules.pairs import Layout, PairRecord, natural_key, pair_by_stem, stem_id
from datamodules.errors import DataError


@register_dataset("kvasir_seg")
class KvasirSeg(Layout):
    """Kvasir-SEG polyps (1000 pairs).

    Masks are 3-channel JPEGs whose edges carry compression noise, so they are thresholded
    (mean channel > 127) instead of checked for exact 0/255. ``train.txt``/``val.txt`` in the
    root (the official 880/120 split) make val.txt the test set; val is carved from train.
    """

    name = "kvasir_seg"
    classes = ("background", "polyp")
    prompt = "an endoscopic image of a colorectal polyp"
    modality = "polyp"
    expected = "images/<id>.jpg and masks/<id>.jpg (optional train.txt/val.txt)"
    lossy_masks = True

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        img_dir = self.require_dir(root, "images")
        mask_dir = self.require_dir(root, "masks")
        return pair_by_stem(img_dir, mask_dir, problems)

    def official_split(self, root: Path, records: Sequence[PairRecord]) -> Optional[dict]:
        train_txt, val_txt = root / "train.txt", root / "val.txt"
        if not (train_txt.is_file() and val_txt.is_file()):
            return None
        known = {r.id for r in records}
        out = {}
        # The official val.txt is the held-out set: use it as test, never for model selection.
        for split, path in (("train", train_txt), ("test", val_txt)):
            names = [stem_id(Path(line.strip())) for line in path.read_text().splitlines()
                     if line.strip()]
            missing = sorted(set(names) - known, key=natural_key)
            if missing:
                raise DataError(f"{path} lists ids without an image/mask pair: {missing[:10]}; "
                                f"restore those files or remove {path.name} to split randomly")
            out[split] = names
        return out
