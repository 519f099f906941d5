"""The feature validator's training data, written to disk a batch at a time and read through memory maps.

Each real pair (and transformed copy, :class:`~lightning_modules.gating.validator_bank.AugmentedPairs`)
gives three items: the pair as it is, the pair conditioned on its mask moved by half the image (misplaced)
and the pair with its lesion erased but conditioned on its mask (missing); the target of every item is
where the lesion truly is. Features are stored as float16 on the latent grid (2·F·h·w bytes per item) and
the targets as uint8 at image size, so host memory holds one batch whatever the number of pairs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_modules.gating.batching import in_chunks
from lightning_modules.gating.latent_gate import encode_condition, encode_prompt
from lightning_modules.gating.unet_features import unet_features
from lightning_modules.gating.validator_bank import erase_lesions
from lightning_modules.progress import progress

VARIANTS = ("as_is", "misplaced", "missing")


def _variants(images: torch.Tensor, masks: torch.Tensor):
    """``(images, condition masks, targets)`` of each variant of a batch of pairs."""
    h, w = masks.shape[-2:]
    erased, truth = erase_lesions(images, masks)
    return [(images, masks, masks), (images, masks.roll((h // 2, w // 2), (-2, -1)), masks), (erased, masks, truth)]


class FeatureBank(Dataset):
    """Items ``{"feats": float16 (F,h,w), "mask": uint8 (H,W)}`` read from the bank's memory maps."""

    def __init__(self, folder: Path, mean: torch.Tensor, std: torch.Tensor):
        self.feats = np.load(Path(folder) / "feats.npy", mmap_mode="r")
        self.masks = np.load(Path(folder) / "masks.npy", mmap_mode="r")
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {"feats": torch.from_numpy(np.array(self.feats[i])), "mask": torch.from_numpy(np.array(self.masks[i]))}


@torch.no_grad()
def build_feature_bank(diffusion, pairs, prompt: str, t: int, folder: Path, seed: int = 0,
                       batch: int = 16) -> FeatureBank:
    """Features of every pair in ``pairs`` (``len``, ``get(start, stop) -> (images, masks)``) × :data:`VARIANTS`.

    Args:
        diffusion: the model whose UNet gives the features (the run's gate model).
        t: the timestep of the features (``validator.t_eval``).
        folder: where ``feats.npy`` / ``masks.npy`` are written (the caller removes it).

    Returns:
        The bank, with the per-channel mean and standard deviation of its features (F,).
    """
    device = next(diffusion.unet.parameters()).device
    text = encode_prompt(diffusion, prompt)
    generator = torch.Generator().manual_seed(seed)
    n = len(pairs) * len(VARIANTS)
    feats = masks = None
    total = total_sq = None
    row = 0
    starts = range(0, len(pairs), batch)
    for start in progress(starts, "feature validator data", total=len(starts), unit="batch"):
        images, pair_masks = pairs.get(start, min(start + batch, len(pairs)))
        for variant_images, cond, target in _variants(images, pair_masks):
            z0, mask_lat, masked_lat = in_chunks(lambda *a: encode_condition(diffusion, *a),
                                                 variant_images.to(device), cond.to(device))
            f = unet_features(diffusion, z0, mask_lat, masked_lat, text, t, generator).cpu()
            if feats is None:  # shapes known from the first batch
                Path(folder).mkdir(parents=True, exist_ok=True)
                feats = np.lib.format.open_memmap(Path(folder) / "feats.npy", "w+", np.float16, (n, *f.shape[1:]))
                masks = np.lib.format.open_memmap(Path(folder) / "masks.npy", "w+", np.uint8, (n, *target.shape[1:]))
                total, total_sq = torch.zeros(f.shape[1], dtype=torch.float64), torch.zeros(f.shape[1], dtype=torch.float64)
            feats[row:row + len(f)] = f.numpy().astype(np.float16)
            masks[row:row + len(f)] = target.numpy().astype(np.uint8)
            total += f.double().sum((0, 2, 3))
            total_sq += f.double().pow(2).sum((0, 2, 3))
            row += len(f)
    feats.flush(), masks.flush()
    count = n * feats.shape[2] * feats.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp(min=0).sqrt()
    return FeatureBank(folder, mean.float(), std.float().clamp(min=1e-5))
