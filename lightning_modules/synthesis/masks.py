"""Stochastic lesion-mask generator with MedDiff-FT's hierarchical randomness.

Level 1 (shape): a connected lesion component of a real training mask, or a parametric blob
(an ellipse whose radius is perturbed by a few random Fourier harmonics).
Level 2 (geometry): scale, rotation and a translation drawn uniformly among the placements that
keep the whole mask inside the field of view and away from existing lesions.
Level 3 (boundary): a smooth random displacement field plus a random opening/closing.

Every random choice lands in a JSON-serialisable ``params`` dict, and :meth:`MaskGenerator.render`
rebuilds the identical mask from ``params`` alone, so a manifest line is a full recipe.
Multi-class (nested, e.g. fundus disc = 1 with cup = 2 inside it) is handled by treating the
whole structure (``mask > 0``) as the shape and jittering the inner class within the outer one.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import cv2
import numpy as np
from scipy import ndimage, signal


class MaskGenerationError(RuntimeError):
    """No valid placement was found within the retry budget; the message says why."""


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of shape (2r+1, 2r+1)."""
    r = int(max(radius, 0))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= r * r


def fov_from_image(image: np.ndarray, threshold: int = 12, margin_px: int = 1) -> np.ndarray:
    """Field of view = non-black pixels (endoscopy / fundus circular FOV, ultrasound sector).

    Args:
        image: uint8 (S,S,3) image.
        threshold: Max channel value below which a pixel counts as black.
        margin_px: Erode the FOV so a lesion never touches the black border.

    Returns:
        bool (S,S); all True when the image has no black frame.
    """
    fov = image.max(axis=-1) > threshold
    # Dark lesions or shadows inside the FOV are not "outside": fill holes, drop specks.
    # Opening by hand: the erosion treats the image edge as inside (it is no FOV boundary).
    fov = ndimage.binary_dilation(ndimage.binary_erosion(fov, disk(1), border_value=1), disk(1))
    fov = ndimage.binary_fill_holes(fov)
    if fov.sum() < 0.25 * fov.size:  # a mostly dark image: thresholding is meaningless
        return np.ones(fov.shape, bool)
    if margin_px > 0:
        fov = ndimage.binary_erosion(fov, disk(margin_px), border_value=1)
    return fov


def _components(real_masks: np.ndarray, min_area: int) -> list:
    """Connected components (of ``mask > 0``) as (crop uint8 labels, mask index, label, area)."""
    comps = []
    for i, m in enumerate(real_masks):
        lab, n = ndimage.label(m > 0)
        for j, sl in enumerate(ndimage.find_objects(lab), start=1):
            region = lab[sl] == j
            if region.sum() >= min_area:
                comps.append((np.where(region, m[sl], 0).astype(np.uint8), i, j, int(region.sum())))
    return comps


class MaskGenerator:
    """Samples new lesion masks; see the module docstring for the three levels of randomness.

    Args:
        real_masks: uint8 (N,S,S) class-index masks of the training split (shape bank).
        fov: bool (S,S) default field of view, or None (whole image); ``sample`` may override it.
        scale_range: (lo, hi) uniform scale applied to the shape.
        elastic: Boundary-jitter strength: displacement amplitude as a fraction of the shape's
            equivalent radius (0 disables the displacement field).
        mask_source: ``real`` (components of real masks), ``blob`` or ``mixed`` (50/50).
        margin_px: Existing lesions are dilated by this many pixels before they block placement.
        max_tries: Shape/geometry re-draws before :class:`MaskGenerationError`.
        min_area: Smallest component (pixels) kept in the shape bank and in an output mask.
    """

    def __init__(self, real_masks: np.ndarray, fov: Optional[np.ndarray] = None,
                 scale_range: Sequence[float] = (0.6, 1.4), elastic: float = 0.2,
                 mask_source: str = "mixed", margin_px: Optional[int] = None,
                 max_tries: int = 30, min_area: int = 4):
        real_masks = np.asarray(real_masks, dtype=np.uint8)
        if real_masks.ndim != 3:
            raise ValueError(f"real_masks must be (N,S,S), got shape {real_masks.shape}")
        if mask_source not in ("real", "blob", "mixed"):
            raise ValueError(f"mask_source must be real|blob|mixed, got {mask_source!r}")
        self.size = int(real_masks.shape[-1])
        self.fov = None if fov is None else np.asarray(fov, bool)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.elastic, self.max_tries, self.min_area = float(elastic), int(max_tries), int(min_area)
        self.margin_px = int(margin_px) if margin_px is not None else max(2, round(0.03 * self.size))
        self.components = _components(real_masks, min_area)
        self.num_classes = int(max(2, real_masks.max() + 1))
        if mask_source == "real" and not self.components:
            raise MaskGenerationError("mask_source='real' but the training masks hold no lesion "
                                      "component; use generation.mask_source=blob or mixed")
        self.mask_source = mask_source if self.components else "blob"
        # Blobs get the typical real lesion size so both shape kinds share a size distribution.
        areas = [c[3] for c in self.components]
        self.blob_radius = float(np.sqrt(np.median(areas) / np.pi)) if areas else 0.12 * self.size

    # ---------------------------------------------------------------- drawing params
    def _draw_shape(self, rng: np.random.Generator) -> dict[str, Any]:
        kind = self.mask_source
        if kind == "mixed":
            kind = "real" if rng.random() < 0.5 else "blob"
        p: dict[str, Any] = {"shape": kind}
        if kind == "real":
            k = int(rng.integers(len(self.components)))
            p.update(component=k, source_mask_index=self.components[k][1],
                     component_label=self.components[k][2])
        else:
            p.update(blob_radius=self.blob_radius, blob_aspect=float(rng.uniform(0.6, 1.0)),
                     harmonic_amp=[float(a) for a in rng.uniform(0, 0.12, 4) / np.arange(1, 5)],
                     harmonic_phase=[float(a) for a in rng.uniform(0, 2 * np.pi, 4)])
        p["scale"] = float(rng.uniform(*self.scale_range))
        p["angle"] = float(rng.uniform(0.0, 360.0))
        p["elastic"] = self.elastic
        p["jitter_seed"] = int(rng.integers(2**31 - 1))
        p["morph_op"] = str(rng.choice(["none", "open", "close"]))
        p["morph_radius"] = int(rng.integers(1, 3))
        if self.num_classes > 2:  # inner-class (cup) jitter relative to the outer structure
            p["inner_scale"] = float(rng.uniform(0.85, 1.15))
        return p

    # ---------------------------------------------------------------- rendering
    def _base_shape(self, p: dict[str, Any]) -> np.ndarray:
        """Unscaled shape as a uint8 label crop (h,w)."""
        if p["shape"] == "real":
            return self.components[p["component"]][0]
        r = p["blob_radius"]
        theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        rad = 1.0 + sum(a * np.cos((k + 2) * theta + ph)
                        for k, (a, ph) in enumerate(zip(p["harmonic_amp"], p["harmonic_phase"])))
        half = int(np.ceil(2 * r)) + 2
        pts = np.stack([half + r * rad * np.cos(theta), half + r * p["blob_aspect"] * rad * np.sin(theta)], 1)
        crop = np.zeros((2 * half + 1, 2 * half + 1), np.uint8)
        cv2.fillPoly(crop, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        if self.num_classes > 2:  # blob disc gets a concentric cup of ~half its radius
            cup = np.zeros_like(crop)
            cv2.fillPoly(cup, [np.round((half + (pts - half) * 0.5) * 16).astype(np.int32)], 1, shift=4)
            crop = crop + cup
        return crop

    def _transform(self, crop: np.ndarray, scale: float, angle: float) -> np.ndarray:
        """Scale + rotate a label crop about its centre into a canvas that holds it whole."""
        h, w = crop.shape
        side = int(np.ceil(np.hypot(h, w) * scale)) + 4
        mat = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, scale)
        mat[:, 2] += ((side - 1) / 2 - (w - 1) / 2, (side - 1) / 2 - (h - 1) / 2)
        out = np.zeros((side, side), np.uint8)
        # Warp each nested region as a soft map (linear) then threshold: smoother than nearest.
        for c in range(1, int(crop.max()) + 1):
            soft = cv2.warpAffine((crop >= c).astype(np.float32), mat, (side, side), flags=cv2.INTER_LINEAR)
            out[soft >= 0.5] = c
        return out

    def _jitter(self, shape: np.ndarray, p: dict[str, Any]) -> np.ndarray:
        """Level 3: smooth displacement field + random open/close, per nested class."""
        jr = np.random.default_rng(p["jitter_seed"])
        side = shape.shape[0]
        fg = shape > 0
        radius = np.sqrt(max(fg.sum(), 1) / np.pi)
        out = shape
        if p["elastic"] > 0:
            sigma = max(1.0, 0.5 * radius)  # low-frequency warps: lobes, not pixel noise
            fields = [ndimage.gaussian_filter(jr.standard_normal((side, side)), sigma) for _ in range(2)]
            norm = max(np.abs(fields[0]).max(), np.abs(fields[1]).max(), 1e-8)
            amp = p["elastic"] * radius / norm
            yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
            map_y = (yy + amp * fields[0]).astype(np.float32)
            map_x = (xx + amp * fields[1]).astype(np.float32)
            warped = np.zeros_like(shape)
            for c in range(1, int(shape.max()) + 1):
                soft = cv2.remap((shape >= c).astype(np.float32), map_x, map_y, cv2.INTER_LINEAR)
                warped[soft >= 0.5] = c
            out = warped
        if p["morph_op"] != "none":
            op = ndimage.binary_opening if p["morph_op"] == "open" else ndimage.binary_closing
            res = np.zeros_like(out)
            for c in range(1, int(shape.max()) + 1):
                res[op(out >= c, disk(p["morph_radius"]))] = c
            out = res
        return out

    def _nest_inner(self, shape: np.ndarray, p: dict[str, Any]) -> np.ndarray:
        """Multi-class: rescale the inner class about its centroid, then clip it inside the outer."""
        if self.num_classes <= 2 or not (shape >= 2).any():
            return shape
        inner = (shape >= 2).astype(np.float32)
        cy, cx = ndimage.center_of_mass(inner)
        mat = cv2.getRotationMatrix2D((cx, cy), 0.0, p["inner_scale"])
        inner = cv2.warpAffine(inner, mat, inner.shape[::-1], flags=cv2.INTER_LINEAR) >= 0.5
        # Keep a 1-px rim of the outer class around the inner one (cup strictly inside disc).
        inner &= ndimage.binary_erosion(shape > 0, disk(1))
        out = (shape > 0).astype(np.uint8)
        out[inner] = 2
        return out

    def render_shape(self, p: dict[str, Any]) -> np.ndarray:
        """Levels 1 and 3 plus scale/rotation: the placed-at-origin label canvas (side,side)."""
        shape = self._transform(self._base_shape(p), p["scale"], p["angle"])
        shape = self._nest_inner(self._jitter(shape, p), p)
        # Jitter can split off specks: keep the largest connected structure only.
        lab, n = ndimage.label(shape > 0)
        if n > 1:
            keep = 1 + int(np.argmax(ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))))
            shape = np.where(lab == keep, shape, 0).astype(np.uint8)
        return shape

    def render(self, p: dict[str, Any]) -> np.ndarray:
        """Rebuild the full (S,S) uint8 mask from a ``params`` dict returned by :meth:`sample`."""
        shape = self.render_shape(p)
        out = np.zeros((self.size, self.size), np.uint8)
        h, w = shape.shape
        y0, x0 = p["dy"], p["dx"]
        ys, xs = slice(max(y0, 0), min(y0 + h, self.size)), slice(max(x0, 0), min(x0 + w, self.size))
        out[ys, xs] = shape[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return out

    # ---------------------------------------------------------------- sampling
    def _valid_offsets(self, shape: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """bool (S+h-1, S+w-1) map of top-left offsets where the whole shape lies within ``allowed``.

        Counts forbidden pixels under the shape at every offset with one FFT correlation, so the
        translation is drawn exactly (uniform over valid placements) instead of by rejection.
        Index (i, j) corresponds to offset (dy, dx) = (i - h + 1, j - w + 1).
        """
        fg = (shape > 0).astype(np.float64)
        forbidden = (~allowed).astype(np.float64)
        pad = np.pad(forbidden, [(fg.shape[0] - 1,) * 2, (fg.shape[1] - 1,) * 2], constant_values=1)
        hits = signal.fftconvolve(pad, fg[::-1, ::-1], mode="valid")
        return hits < 0.5

    def sample(self, rng: np.random.Generator, occupied: Optional[np.ndarray] = None,
               fov: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw one mask.

        Args:
            rng: Source of every random choice (same state -> same mask and params).
            occupied: bool (S,S) existing lesions of the source image; the new mask keeps
                ``margin_px`` away from them. None = nothing occupied.
            fov: bool (S,S) field of view of the source image; overrides the constructor's.

        Returns:
            mask: uint8 (S,S) class indices of the new lesion only.
            params: JSON-serialisable record of every choice (``render(params)`` == mask).

        Raises:
            MaskGenerationError: no valid placement after ``max_tries`` draws.
        """
        S = self.size
        fov = self.fov if fov is None else np.asarray(fov, bool)
        allowed = np.ones((S, S), bool) if fov is None else fov.copy()
        if occupied is not None and np.any(occupied):
            allowed &= ~ndimage.binary_dilation(np.asarray(occupied, bool), disk(self.margin_px))
        free = int(allowed.sum())
        last = "no draw"
        for attempt in range(self.max_tries):
            p = self._draw_shape(rng)
            shape = self.render_shape(p)
            area = int((shape > 0).sum())
            if area < self.min_area:
                last = f"shape area {area} px < min_area {self.min_area}"
                continue
            valid = self._valid_offsets(shape, allowed)
            cand = np.flatnonzero(valid)
            if cand.size == 0:
                last = f"shape of {area} px fits nowhere in {free} free px (FOV minus dilated lesions)"
                continue
            i, j = np.unravel_index(int(cand[rng.integers(cand.size)]), valid.shape)
            p["dy"], p["dx"] = int(i) - shape.shape[0] + 1, int(j) - shape.shape[1] + 1
            p["attempt"], p["area"] = attempt, area
            mask = self.render(p)
            ys, xs = np.nonzero(mask)
            p["center_y"], p["center_x"] = float(ys.mean()), float(xs.mean())
            return mask, p
        raise MaskGenerationError(f"no valid lesion placement after {self.max_tries} tries; last "
                                  f"reason: {last}. Lower generation.scale_range or use sources "
                                  f"with more lesion-free area")
