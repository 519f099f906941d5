"""Label-free training pairs for the latent validator: real lesions pasted into lesion-free images.

A run with a normal pool (``data.n_normal``: lesion-free images outside the label budget) has many
backgrounds but few labelled lesions. Pasting a labelled lesion (one connected component, its own
texture, :func:`lightning_modules.synthesis.copy_paste.copy_paste`) at a random place of a pool image
makes a pair whose mask is exact by construction, so the validator meets the few lesions on many
backgrounds without another label.
"""
from __future__ import annotations

import numpy as np
import torch

from lightning_modules.synthesis.copy_paste import copy_paste, donor_mask, lesion_components


def _moved(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` (S,S) with its bounding box moved to a random place where it stays whole."""
    rows, cols = np.nonzero(mask)
    top, left, h, w = rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    y, x = int(rng.integers(0, mask.shape[0] - h + 1)), int(rng.integers(0, mask.shape[1] - w + 1))
    out = np.zeros_like(mask)
    out[y:y + h, x:x + w] = mask[top:top + h, left:left + w]
    return out


class PastedPairs:
    """``base`` (the labelled pairs and their copies) followed by ``n_pasted`` pasted pairs, made on demand.

    Same interface as :class:`lightning_modules.gating.validator_bank.AugmentedPairs` (``len``, ``get``).

    Args:
        base: an ``AugmentedPairs`` of the labelled pairs (its ``images`` / ``masks`` give the donors).
        pool: uint8 (M,S,S,3) lesion-free images (no lesion of their own: their mask is empty).
        n_pasted: pasted pairs to add.
        seed: draws donor, pool image, place and angle of each pasted pair.
    """

    def __init__(self, base, pool: np.ndarray, n_pasted: int, seed: int = 0):
        masks = base.masks.detach().cpu().numpy() if torch.is_tensor(base.masks) else np.asarray(base.masks)
        self.base, self.pool, self.masks = base, np.asarray(pool), masks.astype(np.uint8)
        if not len(self.pool):
            raise ValueError("validator.pasted_pairs needs lesion-free pool images (data.n_normal > 0)")
        comps = lesion_components(self.masks, range(len(self.masks)))
        rng = np.random.default_rng(seed)
        self.plans = [(comps[int(rng.integers(len(comps)))], int(rng.integers(len(self.pool))),
                       int(rng.integers(2**31)), float(rng.uniform(0, 360))) for _ in range(int(n_pasted))]

    def __len__(self) -> int:
        return len(self.base) + len(self.plans)

    def _pasted(self, k: int):
        (row, label), source, seed, angle = self.plans[k]
        donor = donor_mask(self.masks, row, label)
        new_mask = _moved(donor, np.random.default_rng(seed))
        _, donor_image, _ = self.base._real(row)
        image = copy_paste(self.pool[source], new_mask, donor_image, donor, angle=angle)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, torch.from_numpy(new_mask.astype(np.int64))

    def get(self, start: int, stop: int):
        """Items ``start..stop-1`` as ``(images (B,3,H,W) float [0,1], masks (B,H,W) int64)`` on the CPU."""
        n = len(self.base)
        parts = [self.base.get(start, min(stop, n))] if start < n else []
        pasted = [self._pasted(k - n) for k in range(max(start, n), stop)]
        if pasted:
            parts.append((torch.stack([p[0] for p in pasted]), torch.stack([p[1] for p in pasted])))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
