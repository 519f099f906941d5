"""Mask erosion ("corrosion" in MedDiff-FT): shrink synthetic labels to their confident core.

A generated lesion's boundary is the least faithful part of the image; eroding the label by a
pixel or two trades a little recall at the rim for labels that never call background "lesion".
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lightning_modules.synthesis.masks import disk


def erode_mask(mask: np.ndarray, px: int, nested: bool = True, keep_nonempty: bool = True) -> np.ndarray:
    """Erode every foreground class of a class-index mask by ``px`` pixels.

    Args:
        mask: uint8 (S,S) class indices (0 = background).
        px: Erosion radius in pixels (disk); 0 returns a copy.
        nested: Classes are nested (fundus: the cup = 2 lies inside the disc = 1, so region k is
            ``mask >= k``). Eroding each nested region keeps the nesting (erosion is monotone),
            and pixels shaved off the cup become disc, not background. ``False`` erodes each
            class's own pixels independently (removed pixels become background).
        keep_nonempty: If a class would vanish (a lesion thinner than 2·px), erode it by the
            largest radius that keeps it, rather than leaving a visible lesion unlabelled
            (decided per connected component).

    Returns:
        uint8 (S,S) eroded mask, same classes.
    """
    mask = np.asarray(mask, np.uint8)
    if px <= 0 or not mask.any():
        return mask.copy()
    out = np.zeros_like(mask)
    for c in range(1, int(mask.max()) + 1):
        region = mask >= c if nested else mask == c
        if not region.any():
            continue
        # border_value=1: the image edge is not a lesion boundary, so it does not erode.
        eroded = ndimage.binary_erosion(region, disk(px), border_value=1)
        if keep_nonempty:
            eroded = _restore_vanished(region, eroded, px)
        if nested and c > 1:
            eroded &= out >= c - 1  # keep class c inside the eroded class c-1
        out[eroded] = c
    return out


def _restore_vanished(region: np.ndarray, eroded: np.ndarray, px: int) -> np.ndarray:
    """Per connected component: if erosion erased it, use the largest radius that keeps it."""
    lab, n = ndimage.label(region)
    if n == 0:
        return eroded
    survived = ndimage.maximum(eroded, lab, range(1, n + 1))
    for j in np.flatnonzero(np.asarray(survived) == 0) + 1:
        comp = lab == j
        kept = comp
        for r in range(int(px) - 1, 0, -1):
            cand = ndimage.binary_erosion(comp, disk(r), border_value=1)
            if cand.any():
                kept = cand
                break
        eroded = eroded | kept
    return eroded
