"""ISIC 2018 task 1 skin lesions: ``ISIC_<id>.jpg`` + ``ISIC_<id>_segmentation.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from datamodules import register_dataset
from datamodules.pairs import Layout, pair_by_stem

SUFFIX = "_segmentation"
# (split, image folder, mask folder); validation/test sets are used as official when present.
SETS = (
    ("train", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    ("val", "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    ("test", "ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
)


def _mask_id(stem: str) -> Optional[str]:
    # Only "<id>_segmentation" files are masks; LICENSE/ATTRIBUTION etc. are skipped.
    return stem[: -len(SUFFIX)] if stem.endswith(SUFFIX) else None


@register_dataset("isic2018")
class Isic2018(Layout):
    """ISIC 2018 lesion boundary segmentation (2594 training pairs, masks 0/255)."""

    name = "isic2018"
    classes = ("background", "lesion")
    prompt = "a dermoscopic image of a skin lesion"
    modality = "skin"
    expected = (f"{SETS[0][1]}/ISIC_<id>.jpg + {SETS[0][2]}/ISIC_<id>_segmentation.png "
                f"(validation/test folders alike are optional)")

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        records = []
        for split, img_name, mask_name in SETS:
            if split != "train" and not (root / img_name).is_dir():
                continue
            img_dir = self.require_dir(root, img_name)
            mask_dir = self.require_dir(root, mask_name)
            records += pair_by_stem(img_dir, mask_dir, problems, image_exts=(".jpg", ".jpeg"),
                                    mask_exts=(".png",), mask_id=_mask_id, split=split)
        return records

    def official_split(self, root, records):
        out = super().official_split(root, records)
        return out if out and len(out) > 1 else None
