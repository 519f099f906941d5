"""Copy-paste control: paste a real training lesion into a new mask (no diffusion).

Same masks and sources as the diffusion path; only the pixels inside the new mask change (plus
a feathered rim just outside it). Steps per nested class c (binary: c = 1; fundus: disc then cup):

1. Crop the donor's region ``donor_mask >= c`` and extend its texture over the crop's bounding
   box (``cv2.inpaint``), so the warped texture covers any target shape, not only the donor's.
2. Rotate (reflect-padded) and resize the texture to the new region's bounding box.
3. Colour-match in Lab: keep the donor lesion's *relation* to its own surroundings
   (mean offset, std ratio) and re-express it relative to the target surroundings, so a red
   polyp stays "redder than the mucosa" on a darker or paler background.
4. Blend with a feathered alpha: 1 inside the mask, falling to 0 within ~2σ outside it.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from scipy import ndimage

from lightning_modules.synthesis.masks import disk

# The copy-paste generator's own version (1 = before versions existed): 2 = robust (median/MAD)
# colour statistics, so vessels around a fundus disc no longer darken the pasted one. The generate
# stage adds it to its signature for copy-paste runs only, so only their outputs are recomputed.
COPY_PASTE_VERSION = 2


def _bbox(region: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(region)
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def _lab(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (H,W,3) -> float32 Lab (L in 0..100)."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _rgb(lab: np.ndarray) -> np.ndarray:
    """float32 Lab (H,W,3) -> float32 RGB in [0,1] (clipped)."""
    return np.clip(cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB), 0.0, 1.0)


def _ring(region: np.ndarray, width: int, exclude: Optional[np.ndarray]) -> np.ndarray:
    """bool ring of ``width`` px around ``region`` (the lesion's surroundings)."""
    ring = ndimage.binary_dilation(region, disk(width)) & ~region
    if exclude is not None:
        ring &= ~exclude
    return ring


def _stats(lab: np.ndarray, where: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust centre and spread (median, 1.4826·MAD) of the Lab pixels in ``where``.

    Robust because a lesion's surroundings often hold a few vessels or folds (fundus, colon):
    with mean/std they dominate the spread, and the contrast ratio would paint the pasted
    lesion's own vessels nearly black.
    """
    pix = lab[where] if where.sum() >= 3 else lab[fallback]
    centre = np.median(pix, 0)
    return centre, 1.4826 * np.median(np.abs(pix - centre), 0) + 1e-3


def donor_texture(donor_image: np.ndarray, donor_region: np.ndarray) -> np.ndarray:
    """Donor lesion texture extended over its bounding box.

    Args:
        donor_image: uint8 (S,S,3).
        donor_region: bool (S,S) the donor lesion (one class region).

    Returns:
        uint8 (h,w,3) crop whose non-lesion pixels are inpainted from lesion pixels.
    """
    ys, xs = _bbox(donor_region)
    crop = np.ascontiguousarray(donor_image[ys, xs])
    holes = (~donor_region[ys, xs]).astype(np.uint8)
    if holes.any():
        crop = cv2.inpaint(crop, holes, 3, cv2.INPAINT_TELEA)
    return crop


def _paste_region(out: np.ndarray, region: np.ndarray, donor_image: np.ndarray,
                  donor_region: np.ndarray, angle: float, feather_px: float,
                  exclude: Optional[np.ndarray], donor_exclude: Optional[np.ndarray]) -> np.ndarray:
    """Paste one class region; returns float32 RGB (S,S,3) in [0,1]."""
    ys, xs = _bbox(region)
    h, w = ys.stop - ys.start, xs.stop - xs.start
    tex = donor_texture(donor_image, donor_region)
    if angle:
        th, tw = tex.shape[:2]
        mat = cv2.getRotationMatrix2D(((tw - 1) / 2, (th - 1) / 2), angle, 1.0)
        tex = cv2.warpAffine(tex, mat, (tw, th), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    tex = cv2.resize(tex, (w, h), interpolation=cv2.INTER_LINEAR if h * w > tex.shape[0] * tex.shape[1]
                     else cv2.INTER_AREA)
    # The feathered rim reaches ``m`` px beyond the bbox: extend the texture there by reflection,
    # or the rim would blend toward nothing (a dark, box-shaped halo).
    m = int(np.ceil(2 * feather_px)) + 1
    tex = cv2.copyMakeBorder(tex, m, m, m, m, cv2.BORDER_REFLECT101)

    # Colour relation of the donor lesion to its own surroundings, re-applied at the target.
    width = max(2, int(round(0.25 * np.sqrt(region.sum()))))
    d_lab, t_lab = _lab(donor_image), _lab(out)
    d_mu, d_sd = _stats(d_lab, donor_region, donor_region)
    ds_mu, ds_sd = _stats(d_lab, _ring(donor_region, width, donor_exclude), ~donor_region)
    ts_mu, ts_sd = _stats(t_lab, _ring(region, width, exclude), ~region)
    target_mu = ts_mu + (d_mu - ds_mu)
    # Contrast follows the target only in lightness; chroma spread stays the donor's, since a
    # ring holding vessels or folds has a chroma spread that says nothing about the lesion.
    ratio = np.ones(3, np.float32)
    ratio[0] = np.clip(ts_sd[0] / ds_sd[0], 0.5, 2.0)
    target_sd = d_sd * ratio
    tex_lab = (_lab(tex) - d_mu) / d_sd * target_sd + target_mu
    S_h, S_w = region.shape
    y0, x0 = ys.start - m, xs.start - m
    cy = slice(max(y0, 0), min(ys.stop + m, S_h))
    cx = slice(max(x0, 0), min(xs.stop + m, S_w))
    patch = t_lab.copy()
    patch[cy, cx] = tex_lab[cy.start - y0:cy.stop - y0, cx.start - x0:cx.stop - x0]
    pasted = _rgb(patch)

    # Feathered alpha: exactly 1 on the mask, decaying to 0 just outside (truncated Gaussian).
    alpha = ndimage.gaussian_filter(region.astype(np.float32), feather_px, truncate=2.0) * 2.0
    alpha = np.clip(np.maximum(alpha, region), 0.0, 1.0)[..., None]
    base = out.astype(np.float32) / 255.0
    return alpha * pasted + (1.0 - alpha) * base


def copy_paste(image: np.ndarray, new_mask: np.ndarray, donor_image: np.ndarray,
               donor_mask: np.ndarray, angle: float = 0.0, feather_px: Optional[float] = None,
               occupied: Optional[np.ndarray] = None) -> np.ndarray:
    """Paste the donor's lesion into ``new_mask`` of ``image``.

    Args:
        image: uint8 (S,S,3) source image.
        new_mask: uint8 (S,S) class indices of the new lesion (nested classes: c >= k regions).
        donor_image: uint8 (S,S,3) training image holding the donor lesion.
        donor_mask: uint8 (S,S) class indices of the donor lesion only (one component; other
            lesions of the donor image zeroed).
        angle: Rotation of the donor texture in degrees (a recorded random choice).
        feather_px: Gaussian σ of the border blend; default ~2 % of the image side (≥ 0.7 px).
        occupied: bool (S,S) existing lesions of ``image``, excluded from the surround statistics.

    Returns:
        uint8 (S,S,3); pixels farther than ~2·feather_px from the mask are unchanged.
    """
    image = np.asarray(image, np.uint8)
    if feather_px is None:
        feather_px = max(0.7, 0.02 * image.shape[0])
    out = image.copy()
    for c in range(1, int(new_mask.max()) + 1):
        region, donor_region = new_mask >= c, donor_mask >= c
        if not region.any() or not donor_region.any():
            continue  # donor lacks this class (e.g. a disc without a visible cup): keep outer paste
        blended = _paste_region(out, region, donor_image, donor_region, angle, feather_px,
                                occupied, None)
        out = np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)
    # Pixels outside the feather zone are restored exactly (Lab round-trips are not lossless).
    near = ndimage.binary_dilation(new_mask > 0, disk(int(np.ceil(2 * feather_px)) + 1))
    out[~near] = image[~near]
    return out


def lesion_components(masks: np.ndarray, train_indices, min_area: int = 4) -> list[tuple[int, int]]:
    """All donor candidates: (row, component label) of every training lesion ≥ ``min_area`` px.

    Computed once per run (labelling every mask per sample would dominate at 512 px).

    Raises:
        ValueError: the training split holds no lesion.
    """
    comps = []
    for i in train_indices:
        lab, n = ndimage.label(masks[i] > 0)
        areas = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1)) if n else []
        comps.extend((int(i), j + 1) for j, a in enumerate(areas) if a >= min_area)
    if not comps:
        raise ValueError("copy_paste needs at least one real lesion in the training split (train_few)")
    return comps


def donor_mask(masks: np.ndarray, row: int, label: int) -> np.ndarray:
    """uint8 (S,S) class indices of component ``label`` of ``masks[row]`` only."""
    lab, _ = ndimage.label(masks[row] > 0)
    return np.where(lab == label, masks[row], 0).astype(np.uint8)
