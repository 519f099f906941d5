"""BUSI breast ultrasound: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (<n>).png``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from datamodules import register_dataset
from datamodules.pairs import Layout, PairRecord, list_files, natural_key, report, stem_id

CLASS_DIRS = ("benign", "malignant", "normal")
_MASK = re.compile(r"^(?P<id>.+?)_mask(?:_(?P<k>\d+))?$")


@register_dataset("busi")
class Busi(Layout):
    """BUSI (780 images). Each image's ``_mask.png``, ``_mask_1.png``, ... are united (one per
    lesion); ``normal`` images have empty masks (a missing mask file there means empty too).
    Stratum = benign / malignant / normal so every split keeps the class mix.
    """

    name = "busi"
    classes = ("background", "lesion")
    prompt = "a breast ultrasound image with a lesion"
    modality = "ultrasound"
    expected = ("Dataset_BUSI_with_GT/{benign,malignant,normal}/<cls> (<n>).png with "
                "<cls> (<n>)_mask.png (and _mask_1.png, ...)")

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        base = root / "Dataset_BUSI_with_GT" if (root / "Dataset_BUSI_with_GT").is_dir() else root
        present = [c for c in CLASS_DIRS if (base / c).is_dir()]
        if not present:
            self.require_dir(base, *CLASS_DIRS)  # raises, naming the expected folders
        records = []
        for cls in present:
            images, masks = {}, {}
            for p in list_files(base / cls, (".png", ".jpg", ".jpeg", ".bmp")):
                stem = stem_id(p)
                m = _MASK.match(stem)
                if m:
                    masks.setdefault(m["id"], []).append((int(m["k"] or 0), p))
                else:
                    images[stem] = p
            for key in sorted(images, key=natural_key):
                found = [p for _, p in sorted(masks.get(key, []))]
                if not found and cls != "normal":
                    report(problems, f"image {images[key]} has no mask ({key}_mask.png) in "
                                     f"{base / cls}: add its mask or remove the image")
                    continue
                # Ids carry no folder, so keep the class prefix the files already have.
                records.append(PairRecord(key, images[key], found, stratum=cls))
            for key in sorted(masks.keys() - images.keys(), key=natural_key):
                report(problems, f"mask {masks[key][0][1]} has no image {key}.png in "
                                 f"{base / cls}: add the image or remove the mask")
        return records
