"""The diffusion model's training regions, VAE-encoded once (a *latent bank*).

The VAE is frozen, so every training region's latents are computed once (the prototype's lesson:
UNet training then costs only UNet steps). Each image contributes a lesion variant (lesion mask
under the lesion prompt) and background variants (random lesion-free blobs under the background
prompt); pretraining adds random-shape variants under the null prompt so the model learns to use
the masked-image channels. Used by the finetune stage and by ``experiments.pretrain``.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from lightning_modules.diffusion import InpaintingDiffusion
from lightning_modules.progress import progress

LESION, BACKGROUND, RANDOM = 0, 1, 2


def _smooth_blob(rng: np.random.Generator, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Star-shaped blob with a few random radial harmonics; bool (S,S)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.full_like(ang, r)
    for k in (2, 3, 5):
        rad += r * rng.uniform(0, 0.15) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    sx, sy = rng.uniform(0.7, 1.3, 2)
    return ((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2 <= rad ** 2


def background_blob(lesion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lesion-free blob: random blob placed away from the lesion, minus the dilated lesion.

    Args:
        lesion: bool (S,S). Returns: bool (S,S), never touching ``lesion`` (2 px margin).
    """
    size = lesion.shape[0]
    keepout = ndimage.binary_dilation(lesion, iterations=2) if lesion.any() else lesion
    best, best_area = None, -1
    for _ in range(12):
        blob = _smooth_blob(rng, size, *rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0.07, 0.2) * size) & ~keepout
        if blob.sum() > best_area:
            best, best_area = blob, blob.sum()
        if best_area >= 0.015 * blob.size:  # big enough: stop searching
            break
    return best


def random_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """1–3 rectangles, blobs or brush strokes of varied size anywhere; bool (S,S)."""
    out = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        shape = rng.integers(3)
        if shape == 0:
            h, w = rng.integers(size // 8, size // 2, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            out[y:y + h, x:x + w] = True
        elif shape == 1:
            out |= _smooth_blob(rng, size, *rng.uniform(0.1, 0.9, 2) * size, rng.uniform(0.05, 0.3) * size)
        else:
            pts = np.cumsum(rng.normal(0, size / 8, (6, 2)), 0) + rng.uniform(0.2, 0.8, 2) * size
            yy, xx = np.mgrid[:size, :size]
            for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
                for a in np.linspace(0, 1, 8):
                    cx, cy = x0 + a * (x1 - x0), y0 + a * (y1 - y0)
                    out |= (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 20) ** 2
    return out


@torch.no_grad()
def build_inpainting_bank(model: InpaintingDiffusion, images: np.ndarray, masks: np.ndarray, lesion_prompt_idx,
                      background_prompt_idx, n_background: int = 2, n_random: int = 0, flips: bool = False,
                      seed: int = 0, chunk: int = 64, random_prompt_idx=0) -> dict:
    """Encode every training region once.

    Args:
        images: uint8 (N,S,S,3). masks: uint8 (N,S,S) class indices (lesion = any class > 0).
        lesion_prompt_idx / background_prompt_idx: int or (N,) ints into ``model.prompt_texts``.
        n_background: background-blob variants per image. n_random: random-shape variants.
        flips: also encode horizontally flipped copies (few-shot data).
        random_prompt_idx: int or (N,) ints, the prompt of the random-shape variants (default: null).

    Returns:
        dict of tensors: ``z0`` (N',C,h,w); per variant ``img`` (V,), ``mask_lat`` (V,1,h,w),
        ``masked_lat`` (V,C,h,w), ``prompt_idx`` (V,), ``kind`` (V,) in {LESION, BACKGROUND, RANDOM}.
    """
    les_idx = np.broadcast_to(np.asarray(lesion_prompt_idx), (len(images),))
    bg_idx = np.broadcast_to(np.asarray(background_prompt_idx), (len(images),))
    rand_idx = np.broadcast_to(np.asarray(random_prompt_idx), (len(images),))
    if flips:
        images = np.concatenate([images, images[:, :, ::-1]])
        masks = np.concatenate([masks, masks[:, :, ::-1]])
        les_idx, bg_idx, rand_idx = np.tile(les_idx, 2), np.tile(bg_idx, 2), np.tile(rand_idx, 2)
    rng = np.random.default_rng(seed)
    rows = []  # (image index, region bool (S,S), prompt index, kind)
    for i, m in enumerate(masks > 0):
        if m.any():
            rows.append((i, m, les_idx[i], LESION))
        rows += [(i, background_blob(m, rng), bg_idx[i], BACKGROUND) for _ in range(n_background)]
        rows += [(i, random_region(rng, m.shape[0]), rand_idx[i], RANDOM) for _ in range(n_random)]
    x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    starts = range(0, len(x_all), chunk)
    z0 = torch.cat([model.encode_images(x_all[s:s + chunk]).cpu()
                    for s in progress(starts, "latent cache: images", total=len(starts), unit="batch")])
    mask_lat, masked_lat = [], []
    starts = range(0, len(rows), chunk)
    for s in progress(starts, "latent cache: regions", total=len(starts), unit="batch"):
        part = rows[s:s + chunk]
        x = x_all[[r[0] for r in part]]
        m = torch.from_numpy(np.stack([r[1] for r in part]))[:, None].float()
        masked_lat.append(model.encode_masked(x, m).cpu())
        mask_lat.append(model.mask_to_latent(m, z0.shape[-2:]))
    return dict(z0=z0, img=torch.tensor([r[0] for r in rows]), mask_lat=torch.cat(mask_lat),
                masked_lat=torch.cat(masked_lat), prompt_idx=torch.tensor([int(r[2]) for r in rows]),
                kind=torch.tensor([r[3] for r in rows]))


def variant_weights(bank: dict, background_fraction: float, random_fraction: float = 0.0) -> torch.Tensor:
    """Sampling weights (V,) so kinds are drawn with the requested shares (renormalised if absent)."""
    share = {LESION: 1 - background_fraction - random_fraction, BACKGROUND: background_fraction, RANDOM: random_fraction}
    w = torch.zeros(len(bank["kind"]), dtype=torch.float64)
    for k, f in share.items():
        sel = bank["kind"] == k
        if sel.any():
            w[sel] = max(f, 0.0) / sel.sum()
    return w / w.sum()


class LatentBankDataset(torch.utils.data.Dataset):
    """Serves bank variants as training batches (dicts for :meth:`InpaintingDiffusion.training_loss`)."""

    def __init__(self, bank: dict):
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank["kind"])

    def __getitem__(self, i: int) -> dict:
        b = self.bank
        return dict(z0=b["z0"][b["img"][i]], mask_lat=b["mask_lat"][i], masked_lat=b["masked_lat"][i], prompt_idx=b["prompt_idx"][i])
