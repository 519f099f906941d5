"""Erode: shrink an accepted sample's mask so its boundary sits inside the synthesized lesion (MedDiff-FT)."""
from __future__ import annotations

import numpy as np
import torch

from lightning_modules.gating.erosion import erode_mask


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Erode a class-index mask (H,W) uint8 by ``px`` pixels per class; ``px <= 0`` returns it unchanged."""
    if px <= 0:
        return mask
    result = erode_mask(mask, px)
    return (result.cpu().numpy() if torch.is_tensor(result) else np.asarray(result)).astype(np.uint8)
