"""``meddiffaug data inspect --dataset procedural_<kind> [--center b]``: a procedural pool and its sample grid.

Center A is the fixed test pool of the kind; center B its second acquisition center
(:mod:`datamodules.procedural_center_b`), with what its acquisition shifts measured against A.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from datamodules.errors import DataError
from datamodules.io import atomic_write


def _overlay(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Images (N,S,S,3) uint8 with each mask's boundary drawn in green."""
    out = images.copy()
    out[masks != ndimage.grey_erosion(masks, size=(1, 3, 3))] = (0, 255, 0)
    return out


def sample_grid(images: np.ndarray, masks: np.ndarray, n: int = 8) -> np.ndarray:
    """One image row over its mask-overlay row, ``n`` samples: uint8 (2S, n*S, 3)."""
    n = min(n, len(images))
    return np.concatenate([np.concatenate(list(a[:n]), 1) for a in (images, _overlay(images[:n], masks[:n]))], 0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H,W,3) array as a PNG, atomically."""
    from PIL import Image

    return atomic_write(Path(path), lambda f: Image.fromarray(array).save(f, format="png"), fsync=False)


def center_pool(kind: str, center: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n,S,S,3), masks (n,S,S))`` of center ``a`` (the test pool) or ``b``."""
    from datamodules.procedural import render_test_pool
    from datamodules.procedural_center_b import render_center_b

    if center not in ("a", "b"):
        raise DataError(f"--center is {center!r}; use a (the kind's test pool) or b (its second center)")
    return (render_center_b if center == "b" else render_test_pool)(kind, n, size)


def inspect_procedural(name: str, center: str = "a", n: int = 200, image_size: int = 64,
                       grid: Optional[str] = None, small_lesion_area: float = 0.02) -> dict:
    """Summarise a procedural pool and write its sample grid.

    Args:
        name: ``procedural_<kind>``.
        center: ``a`` (the fixed test pool) or ``b`` (the second acquisition center).
        n: pairs summarised; image_size: their side.
        grid: the PNG to write (default ``outputs/inspect/<name>_center_<center>.png``).

    Returns:
        ``dataset``, ``center``, ``n_pairs``, ``classes``, ``lesion_area`` (quantiles of the lesion
        share of frames with one, ``n_empty``, ``n_small``), ``grid`` and, for center b, ``shift``
        (:func:`datamodules.procedural_center_b.describe_shift`).
    """
    from datamodules.procedural import PROCEDURAL_KINDS
    from datamodules.procedural_center_b import describe_shift

    kind = name[len("procedural_"):]
    if kind not in PROCEDURAL_KINDS:
        raise DataError(f"unknown procedural dataset {name!r}; use procedural_<{'|'.join(PROCEDURAL_KINDS)}>")
    images, masks = center_pool(kind, center, n, image_size)
    area = (masks > 0).reshape(len(masks), -1).mean(1)
    lesion = area[area > 0]
    q = np.quantile(lesion, [0, 0.25, 0.5, 0.75, 1.0]) if len(lesion) else [None] * 5
    path = save_png(sample_grid(images, masks, 16), grid or f"outputs/inspect/{name}_center_{center}.png")
    result = {"dataset": name, "center": center, "n_pairs": int(len(images)),
              "classes": list(PROCEDURAL_KINDS[kind].classes),
              "lesion_area": {**{k: (round(float(v), 5) if v is not None else None)
                                 for k, v in zip(("min", "q1", "median", "q3", "max"), q)},
                              "n_empty": int((area == 0).sum()), "n_small": int((lesion < small_lesion_area).sum())},
              "grid": str(path)}
    if center == "b":
        result["shift"] = describe_shift(kind, n, image_size, small_lesion_area)
    return result


def format_procedural(r: dict) -> str:
    """Human-readable summary of :func:`inspect_procedural`'s result."""
    la = r["lesion_area"]
    lines = [f"dataset {r['dataset']} center {r['center']}: {r['n_pairs']} pairs, classes {', '.join(r['classes'])}",
             f"  lesion area (fraction of image, frames with a lesion): min {la['min']}, q1 {la['q1']}, "
             f"median {la['median']}, q3 {la['q3']}, max {la['max']}; empty {la['n_empty']}, small {la['n_small']}"]
    for center, s in sorted(r.get("shift", {}).items()):
        lines.append(f"  center {center}: mean RGB {s['mean_rgb']}, contrast {s['contrast']}, median lesion area "
                     f"{s['lesion_area_median']}, small share {s['small_share']}, lesion-free {s['lesion_free_share']}")
    lines.append(f"  sample grid (images over mask outlines): {r['grid']}")
    return "\n".join(lines)
