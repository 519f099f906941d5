"""Procedural medical-looking image–mask datasets that ship with the code (the default data).

Each kind imitates one modality closely enough that a segmenter must learn shape, texture and
context: lesion colour overlaps the background, distractors (folds, hair, shadows, vessels) share
the lesion's intensity, so a single threshold does clearly worse than a trained model.

Sample ``i`` depends only on ``(kind, seed, i)``: a pool of 400 extends a pool of 100. Geometry is
drawn in normalised coordinates from its own generator, so the same sample rendered at 32 or 256 px
has the same layout (only the pixel-level texture differs).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from datamodules.procedural_scenes import RENDERERS


@dataclass(frozen=True)
class ProceduralKind:
    """Description of one procedural dataset kind.

    Attributes:
        name: registry suffix (``procedural_<name>``).
        classes: class names, index 0 = background.
        prompt: MSDM-style clinical text of the lesion class.
        background_prompt: clinical text of a lesion-free image (negative / background prompt).
        modality: imaging modality tag shared with the real dataset it imitates.
        description: one line for ``meddiffaug data inspect``.
    """

    name: str
    classes: tuple
    prompt: str
    background_prompt: str
    modality: str
    description: str


PROCEDURAL_KINDS: dict[str, ProceduralKind] = {
    "polyp": ProceduralKind(
        "polyp", ("background", "polyp"),
        "colonoscopy image showing a sessile polyp with smooth mucosal surface",
        "colonoscopy image of normal colon mucosa", "polyp",
        "colonoscopy-like frames with 0-3 polyps (Kvasir-SEG / CVC-ClinicDB stand-in)"),
    "fundus": ProceduralKind(
        "fundus", ("background", "optic_disc", "optic_cup"),
        "color fundus photograph showing the optic disc with a well-defined optic cup",
        "color fundus photograph of the retina", "fundus",
        "retinal fundus images with optic disc and cup (REFUGE stand-in)"),
    "skin": ProceduralKind(
        "skin", ("background", "lesion"),
        "dermoscopy image showing a pigmented skin lesion with irregular border",
        "dermoscopy image of normal skin", "skin",
        "dermoscopy-like images with one pigmented lesion and hair (ISIC 2018 stand-in)"),
    "ultrasound": ProceduralKind(
        "ultrasound", ("background", "lesion"),
        "breast ultrasound image showing a hypoechoic mass with posterior acoustic shadowing",
        "breast ultrasound image of normal breast tissue", "ultrasound",
        "B-mode sector scans with a hypoechoic mass (BUSI stand-in)"),
}


def render_procedural(kind: str, n: int, size: int, seed: int, normal_fraction: float = 0.15,
                      stream: str = ""):
    """Render ``n`` image–mask pairs of a procedural kind.

    Args:
        kind: one of :data:`PROCEDURAL_KINDS` (``polyp``, ``fundus``, ``skin``, ``ultrasound``).
        n: number of samples.
        size: square side ``S`` in pixels.
        seed: content seed; sample ``i`` depends only on ``(kind, seed, i)``.
        normal_fraction: share of lesion-free images (ignored for ``fundus``: every retina has a disc).
        stream: ``""`` (the content of ``data.procedural_seed``), or a named stream such as
            :data:`TEST_STREAM` / :data:`NORMAL_STREAM`: its name enters every sample's seed, so no
            sample of one stream equals a sample of another, whatever the seeds.

    Returns:
        ``images`` uint8 (n,S,S,3), ``masks`` uint8 (n,S,S) class indices, and one meta dict per
        sample: ``id``, ``normal`` (empty mask), ``n_lesions``, ``areas`` (per-lesion image fraction)
        plus kind-specific keys (fundus ``cdr``/``glaucoma``, ultrasound ``posterior``).

    Raises:
        ValueError: unknown kind.
    """
    if kind not in RENDERERS:
        raise ValueError(f"Unknown procedural kind '{kind}'; choose one of {', '.join(RENDERERS)}.")
    code = zlib.crc32(kind.encode())  # stable across processes (hash() is salted)
    words = [code] + ([zlib.crc32(stream.encode())] if stream else [])  # "" keeps the old samples
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    meta = []
    for i in range(n):
        # geometry and pixel texture use separate streams: the layout does not depend on size
        geom, tex = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, i, *words]).spawn(2))
        normal = kind != "fundus" and bool(geom.random() < normal_fraction)
        img, mask, label, extra = RENDERERS[kind](geom, tex, size, normal)
        images[i] = np.clip(np.moveaxis(img, 0, -1) * 255 + 0.5, 0, 255).astype(np.uint8)
        masks[i] = mask
        counts = np.bincount(label.ravel(), minlength=1)[1:] if kind != "fundus" else np.array([])
        areas = [float(c) / size ** 2 for c in counts if c > 0]
        meta.append({"id": f"{kind}_{stream + '_' if stream else ''}s{seed}_{i:05d}", "kind": kind, "normal": not masks[i].any(),
                     "n_lesions": len(areas) if kind != "fundus" else 1, "areas": areas
                     if kind != "fundus" else [float((masks[i] > 0).mean())], **extra})
    return images, masks, meta


# Named content streams (see ``render_procedural``). The test pool is stream TEST_STREAM of content
# seed TEST_POOL_SEED for every run; training, validation and normal-pool content use the run's own
# ``data.procedural_seed`` on the default and NORMAL_STREAM streams, so the test pool is disjoint
# from every training pool by construction.
TEST_STREAM, NORMAL_STREAM, TEST_POOL_SEED = "test", "normal", 0


@lru_cache(maxsize=4)
def render_test_pool(kind: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed test pool of a kind: ``n`` samples of :data:`TEST_STREAM`, identical for every run.

    Cached per process (a grid builds one datamodule per seed); the arrays are read-only.

    Returns:
        ``images`` uint8 (n,S,S,3) and ``masks`` uint8 (n,S,S) class indices.
    """
    images, masks, _ = render_procedural(kind, n, size, TEST_POOL_SEED, stream=TEST_STREAM)
    images.flags.writeable = masks.flags.writeable = False
    return images, masks


# Kinds with no lesion-free image: every retina shows an optic disc and cup, the "lesion" of fundus.
NO_NORMAL_POOL = frozenset({"fundus"})


def render_normal_pool(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    """``n`` lesion-free images of :data:`NORMAL_STREAM` of content seed ``seed``; uint8 (n,S,S,3).

    Raises:
        ValueError: ``kind`` has no lesion-free images (``fundus``: every retina has a disc and cup).
    """
    if kind in NO_NORMAL_POOL:
        raise ValueError(f"procedural_{kind} has no lesion-free images (every retina shows an optic disc "
                         "and cup): set data.n_normal=0")
    images, masks, _ = render_procedural(kind, n, size, seed, normal_fraction=1.0, stream=NORMAL_STREAM)
    assert not masks.any(), "normal-pool images must hold no lesion"
    return images


def save_preview(kind: str, path: str, n: int = 16, size: int = 128, seed: int = 0) -> None:
    """Write a PNG grid of ``n`` samples (image row over mask-overlay row) for eyeballing."""
    from PIL import Image

    images, masks, _ = render_procedural(kind, n, size, seed)
    over = images.copy()
    edge = masks != ndimage.grey_erosion(masks, size=(1, 3, 3))
    over[edge] = (0, 255, 0)
    rows = [np.concatenate(list(a), 1) for a in (images[: n // 2], over[: n // 2], images[n // 2:], over[n // 2:])]
    Image.fromarray(np.concatenate(rows, 0)).save(path)
