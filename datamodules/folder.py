"""Any dataset as ``images/<stem>.<ext>`` + ``masks/<stem>.<ext>`` (png/jpg/tif/bmp)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from datamodules import register_dataset
from datamodules.pairs import Layout, pair_by_stem


@register_dataset("folder")
class Folder(Layout):
    """Generic pairs matched by file stem.

    A mask whose values are {0,255} or {0,1} is binary (lesion = 1); any other mask holds class
    indices as given. Masks must be lossless (PNG/TIF/BMP) for multi-class use.

    Args:
        classes: Class names, index 0 = background. ``None``: binary, or ``class_<k>`` names
            inferred from the largest index found.
        prompt: Clinical text of the lesion class (for the diffusion stages).
        modality: Free-text modality tag.
    """

    name = "folder"
    expected = "images/<stem>.<png|jpg|tif|bmp> + masks/<stem>.<png|jpg|tif|bmp>"

    def __init__(self, classes: Optional[Sequence[str]] = None, prompt: Optional[str] = None,
                 modality: Optional[str] = None):
        self.fixed_classes = classes is not None
        self.classes = tuple(classes) if classes is not None else ("background", "lesion")
        self.prompt = prompt or "a medical image with a lesion"
        self.modality = modality or "generic"

    def discover(self, root: Path, problems: Optional[list] = None) -> list:
        return pair_by_stem(self.require_dir(root, "images"), self.require_dir(root, "masks"),
                            problems)

    def remap(self, raw: np.ndarray, path: Path) -> np.ndarray:
        vals = set(np.unique(raw).tolist())
        if vals <= {0, 255}:
            return (raw // 255).astype(np.uint8)
        return raw.astype(np.uint8)  # {0,1} or class indices: as given

    def classes_for(self, max_index: int) -> tuple:
        if self.fixed_classes or max_index < len(self.classes):
            return self.classes
        return ("background",) + tuple(f"class_{k}" for k in range(1, max_index + 1))
