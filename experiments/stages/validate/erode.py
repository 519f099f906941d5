"""Erode: shrink an accepted sample's NEW lesion so its boundary sits inside the synthesized lesion (MedDiff-FT).

Only the pixels generation painted are uncertain at their rim. With ``generation.source=real`` the
source image's own lesions are in the label too (label = existing ∪ new); they are real, drawn by an
annotator, and keep their rims. The generate stage records the new lesion of every sample
(``new_masks/<id>.png``, the manifest's ``new_mask``); a row without one (a manifest that does not
record it) has its whole label eroded.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from lightning_modules.gating.erosion import erode_mask


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Erode a class-index mask (H,W) uint8 by ``px`` pixels per class; ``px <= 0`` returns it unchanged."""
    if px <= 0:
        return mask
    result = erode_mask(mask, px)
    return (result.cpu().numpy() if torch.is_tensor(result) else np.asarray(result)).astype(np.uint8)


def erode_new_lesion(label: np.ndarray, new_mask: Optional[np.ndarray], px: int) -> np.ndarray:
    """The sample's label with only its newly generated lesion eroded by ``px`` pixels.

    Args:
        label: uint8 (H,W) class indices of the sample (existing lesions ∪ new lesion; the new one
            wins where both are set, as ``synthesis.sources.union_label`` builds it).
        new_mask: uint8 (H,W) class indices of the new lesion alone, or None (unknown: the whole
            label is eroded).
        px: erosion radius; ``px <= 0`` returns ``label`` unchanged.

    Returns:
        uint8 (H,W): outside the new lesion, ``label`` untouched (existing real lesions keep every
        pixel); inside it, the eroded new lesion, its shaved rim set to background.
    """
    if px <= 0:
        return label
    if new_mask is None:
        return erode(label, px)
    new = np.asarray(new_mask, np.uint8)
    if new.shape != label.shape:
        raise ValueError(f"a sample's new-lesion mask has shape {new.shape} but its label has {label.shape}; "
                         f"regenerate the generate stage's folder")
    out = np.where(new > 0, 0, label).astype(np.uint8)  # existing lesions as they are
    eroded = erode(new, px)
    out[eroded > 0] = eroded[eroded > 0]
    return out
