"""A second acquisition center for each procedural kind: the same anatomy, another scanner.

Center A is :func:`datamodules.procedural.render_procedural` as it is (every training, validation
and test pool). Center B renders the same kind of anatomy from its own reserved content stream
(:data:`CENTER_B_STREAM`), so no sample equals one of any other pool, and passes it through the
kind's :class:`Acquisition`: another camera's colour cast and brightness curve, lower contrast,
blur and sensor noise, a magnification (coarser texture relative to the frame) and a lesion-size
distribution shifted towards small lesions (large-lesion frames are kept at a lower rate).
:func:`describe_shift` measures what changed; ``docs/external-tests.md`` shows both centers.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from datamodules.procedural import PROCEDURAL_KINDS, TEST_POOL_SEED, render_procedural

CENTER_B_STREAM = "center_b"
# Per kind: bump when its center B renders other pairs for the same (n, size). It enters the segment
# stage's signature of runs tested on that center B, so their cached results are recomputed.
CENTER_B_VERSION = {"polyp": 1, "skin": 1, "fundus": 2, "ultrasound": 1}
_ACQ_STREAM = "center_b_acquisition"  # per-sample sensor noise and the size selection


@dataclass(frozen=True)
class Acquisition:
    """How center B's scanner differs from center A's.

    Attributes:
        gain: per-channel (R, G, B) gain: the other camera's colour cast.
        gamma: brightness curve ``x ** gamma`` (> 1 darker, < 1 brighter).
        contrast: deviations from each image's mean are scaled by this (< 1: flatter).
        blur: Gaussian blur sigma as a share of the image side (optics, compression).
        noise: std of additive sensor noise on the [0, 1] scale.
        zoom: magnification (>= 1): rendered at ``zoom * S`` and the central ``S x S`` kept, so
            texture and lesions look ``zoom`` times larger relative to the frame.
        large_area: a frame whose lesion pixels (all classes) cover at least this share is "large".
        large_keep: probability of keeping a large frame (< 1 shifts the sizes towards small).
    """

    gain: tuple
    gamma: float
    contrast: float
    blur: float
    noise: float
    zoom: float
    large_area: float
    large_keep: float


# Strengths chosen so that a real-only segmenter of center A loses a clear but partial share of its
# Dice on center B (docs/external-tests.md, benchmarks/external_shift.py): a shift that leaves
# nothing to segment would measure the shift, not the method.
ACQUISITIONS: dict[str, Acquisition] = {
    # a slightly warmer, dimmer light, a softer processor and closer scope; fewer large polyps
    "polyp": Acquisition(gain=(1.01, 0.97, 0.94), gamma=1.05, contrast=0.75, blur=0.012, noise=0.03,
                         zoom=1.2, large_area=0.05, large_keep=0.6),
    # a polarised dermoscope: cooler and brighter, flatter pigment contrast; fewer large lesions
    "skin": Acquisition(gain=(0.93, 0.975, 1.06), gamma=0.9, contrast=0.85, blur=0.006, noise=0.013,
                        zoom=1.1, large_area=0.12, large_keep=0.675),
    # another fundus camera: darker, greener, softer focus; fewer large discs
    "fundus": Acquisition(gain=(0.888, 1.056, 1.14), gamma=1.3, contrast=0.825, blur=0.015, noise=0.017,
                          zoom=1.105, large_area=0.045, large_keep=0.545),
    # another probe and preset: brighter, flatter, coarser speckle, more electronic noise; fewer large masses
    "ultrasound": Acquisition(gain=(1.0, 1.0, 1.0), gamma=0.89, contrast=0.84, blur=0.005, noise=0.023,
                              zoom=1.11, large_area=0.05, large_keep=0.7),
}


def _seed(kind: str, i: int) -> np.random.Generator:
    words = [TEST_POOL_SEED, i, zlib.crc32(kind.encode()), zlib.crc32(_ACQ_STREAM.encode())]
    return np.random.default_rng(np.random.SeedSequence(words))


def acquire(image: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Apply an acquisition to one uint8 (S,S,3) image; returns uint8 (S,S,3)."""
    x = image.astype(np.float32) / 255.0
    x = np.clip(x * np.asarray(acq.gain, np.float32), 0, 1) ** acq.gamma
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = mean + acq.contrast * (x - mean)
    sigma = acq.blur * x.shape[0]
    x = ndimage.gaussian_filter(x, (sigma, sigma, 0))
    x = x + acq.noise * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def render_center_b(kind: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The center-B pool of a kind: ``n`` pairs, identical for every run (cached, read-only).

    Sample candidates come from :data:`CENTER_B_STREAM` of the reserved test content seed; candidate
    ``i`` is kept or dropped by its own draw, so a pool of 100 extends a pool of 50.

    Args:
        kind: one of :data:`datamodules.procedural.PROCEDURAL_KINDS`.
        n: number of pairs.
        size: square side ``S`` in pixels.

    Returns:
        ``images`` uint8 (n,S,S,3) and ``masks`` uint8 (n,S,S) class indices.

    Raises:
        ValueError: unknown kind, or ``n < 1``.
    """
    if kind not in PROCEDURAL_KINDS:
        raise ValueError(f"Unknown procedural kind '{kind}'; choose one of {', '.join(PROCEDURAL_KINDS)}.")
    if n < 1:
        raise ValueError(f"a center-B pool needs n >= 1 pairs, not {n}")
    acq = ACQUISITIONS[kind]
    big = int(round(size * acq.zoom))
    lo = (big - size) // 2
    count = 2 * n + 8
    while True:  # candidates depend only on their index: rendering more repeats the prefix
        images, masks, _ = render_procedural(kind, count, big, TEST_POOL_SEED, stream=CENTER_B_STREAM)
        masks = masks[:, lo:lo + size, lo:lo + size]
        rngs = [_seed(kind, i) for i in range(count)]
        keep = [i for i in range(count)
                if (masks[i] > 0).mean() < acq.large_area or rngs[i].random() < acq.large_keep][:n]
        if len(keep) == n:
            break
        count *= 2
    out = np.stack([acquire(images[i, lo:lo + size, lo:lo + size], acq, rngs[i]) for i in keep])
    masks = np.ascontiguousarray(masks[keep])
    out.flags.writeable = masks.flags.writeable = False
    return out, masks


def describe_shift(kind: str, n: int = 200, size: int = 64, small_area: float = 0.02) -> dict:
    """What differs between center A (the test stream) and center B, measured on ``n`` pairs each.

    Returns:
        ``{"a": stats, "b": stats}`` with per-channel ``mean_rgb``, ``contrast`` (mean per-image std
        on [0,1]), ``lesion_area_median`` (median lesion share of frames with a lesion),
        ``small_share`` (frames whose lesion share is under ``small_area``, of frames with one)
        and ``lesion_free_share``.
    """
    from datamodules.procedural import render_test_pool

    def stats(images: np.ndarray, masks: np.ndarray) -> dict:
        x = images.astype(np.float32) / 255.0
        area = (masks > 0).reshape(len(masks), -1).mean(1)
        lesion = area[area > 0]
        return {"mean_rgb": [round(float(v), 3) for v in x.mean((0, 1, 2))],
                "contrast": round(float(x.reshape(len(x), -1).std(1).mean()), 3),
                "lesion_area_median": round(float(np.median(lesion)), 4) if len(lesion) else None,
                "small_share": round(float((lesion < small_area).mean()), 3) if len(lesion) else None,
                "lesion_free_share": round(float((area == 0).mean()), 3)}

    return {"a": stats(*render_test_pool(kind, n, size)), "b": stats(*render_center_b(kind, n, size))}
