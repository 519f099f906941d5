"""Training items of the latent validator, made from the real pairs (clean latents and ẑ0 estimates).

Pure functions of the diffusion model and the real pairs (no config): the gate training of the
pipeline (:mod:`experiments.runner.gate_training`) and the gate sanity check both use them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.gating.bank_store import BankWriter, ValidatorBank
from lightning_modules.gating.batching import ENCODE_BATCH, in_chunks  # noqa: F401 (ENCODE_BATCH: documented here)
from lightning_modules.gating.latent_gate import add_noise, encode_condition, encode_prompt, estimate_z0
from lightning_modules.progress import progress



class AugmentedPairs:
    """The real pairs plus ``copies - 1`` randomly transformed versions of each (the standard preset),
    made on demand, a slice at a time: never all of them in memory.

    The validator sees 16 pairs in the few-shot setting; transformed copies, encoded by the VAE like
    any image, give it more lesion shapes, positions and colours than 16 latents do. Item ``k`` is
    real pair ``k`` for ``k < N``, else copy ``k // N`` of pair ``k % N``: the originals first.

    Args:
        images: (N,3,H,W) float in [0,1] (any device), or the datamodule's uint8 (N,H,W,3) array.
        masks: (N,H,W) class indices (tensor or array).
        copies: pairs per real pair, itself included.
        seed: draws the transforms (one seed per copy, drawn in item order).
    """

    def __init__(self, images, masks, copies: int = 1, seed: int = 0):
        self.images, self.masks = images, masks
        self.n, self.copies = len(masks), max(1, int(copies))
        self.transform, self.seeds = None, []
        if self.copies > 1:
            from datamodules.transforms import build_transforms

            self.transform = build_transforms("standard", seed=seed)
            rng = np.random.default_rng(seed)
            self.seeds = [int(rng.integers(2**31)) for _ in range(self.n * (self.copies - 1))]

    def __len__(self) -> int:
        return self.n * self.copies

    def _real(self, i: int):
        """Pair ``i`` as (image float (3,H,W), image uint8 (H,W,3), mask int64 (H,W))."""
        image, mask = self.images[i], self.masks[i]
        mask = mask.detach().cpu().long() if torch.is_tensor(mask) else torch.from_numpy(np.asarray(mask).astype(np.int64))
        if torch.is_tensor(image):
            image = image.detach().cpu()
            return image, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mask
        image = np.ascontiguousarray(image)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, image, mask

    def get(self, start: int, stop: int):
        """Items ``start..stop-1`` as ``(images (B,3,H,W) float [0,1], masks (B,H,W) int64)`` on the CPU."""
        images, masks = [], []
        for k in range(start, stop):
            image, array, mask = self._real(k % self.n)
            if k >= self.n:
                # albumentations draws from its own global RNG; seeding it per item keeps the bank reproducible
                self.transform.set_random_seed(self.seeds[k - self.n])
                t = self.transform(image=array, mask=mask.numpy().astype(np.uint8))
                image = torch.from_numpy(t["image"]).permute(2, 0, 1).float() / 255.0
                mask = torch.from_numpy(t["mask"].astype(np.int64))
            images.append(image), masks.append(mask)
        return torch.stack(images), torch.stack(masks)


def augmented_copies(images: torch.Tensor, masks: torch.Tensor, copies: int, seed: int = 0):
    """Every item of :class:`AugmentedPairs` at once (small sets and tests; the bank streams them).

    Returns:
        ``(images (N·copies,3,H,W), masks (N·copies,H,W) int64)`` on the inputs' device; originals first.
    """
    if copies <= 1:
        return images, masks
    pairs = AugmentedPairs(images, masks, copies, seed)
    out_img, out_msk = pairs.get(0, len(pairs))
    return out_img.to(images.device), out_msk.to(masks.device)


def device_of(module) -> torch.device:
    """Where a model's weights live (its ``device`` attribute, else its first parameter or buffer)."""
    device = getattr(module, "device", None)
    if device is None and hasattr(module, "parameters"):
        device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    return torch.device(device or "cpu")


def _mask_rows(n: int, batch_size: int) -> int:
    """Rows of the bank's mask table: each pair's mask and its erased truth, plus the flipped mask that a
    batch of one claims instead of another pair's."""
    return 2 * n + sum(1 for s in range(0, n, batch_size) if min(n, s + batch_size) - s == 1)


def build_validator_bank(diffusion, pairs: AugmentedPairs, prompt: str, t_focus: list, folder: Path,
                         per_image: int = 9, batch_size: int = 16, seed: int = 0,
                         device: Optional[torch.device] = None) -> ValidatorBank:
    """Validator training items from real pairs: clean latents and single-step ẑ0 estimates.

    The inpainting condition makes ε̂ worse inside the conditioning mask, and every real image holds a
    lesion; a validator trained only on (image, own mask) learns "blurry region = lesion" and passes
    samples whose lesion is missing. So the estimates cycle through three conditions:

    * the pair itself, conditioned on its own mask (what a good sample looks like);
    * conditioned on another pair's mask (a clean lesion outside the mask: a *misplaced* lesion);
    * "erased": the lesion region (dilated) replaced by lesion-free pixels of another image
      (:func:`erase_lesions`), conditioned on the original mask (a *missing* lesion).

    Timesteps alternate between the gate's ``t_focus`` and draws in ``[1, 1.5·max(t_focus)]``. Pairs
    are made, moved to ``device`` and encoded ``batch_size`` at a time (the VAE and ε̂ see
    :data:`ENCODE_BATCH` images per call); the items go to disk at once (:mod:`.bank_store`), so memory
    holds one batch whatever ``len(pairs)``.

    Args:
        pairs: the real pairs and their augmented copies.
        folder: where the bank's files go (the caller removes it).
        device: where the diffusion model runs; default: where its weights are.

    Returns:
        The bank: per item ``x (C,h,w)``, ``t``, ``z0 (C,h,w)``, ``mask (H,W)`` (the truth) and ``prompt
        (H,W)`` (the mask the sample claims: its own, another pair's, or the erased one's).
    """
    if not len(pairs):
        raise ValueError("the latent validator needs at least one real training pair (split 'train_few' is empty)")
    device = device or device_of(diffusion)
    gen = torch.Generator().manual_seed(seed)
    T = int(diffusion.num_train_timesteps)
    t_hi = max(2, min(T - 1, int(1.5 * max(t_focus))))
    n, writer = len(pairs), None
    with torch.no_grad():
        text_1 = encode_prompt(diffusion, prompt)  # (1,L,D): one prompt for every pair
        ac = diffusion.alphas_cumprod.to(device)
        for i in progress(range(0, n, batch_size), "gate training data", total=-(-n // batch_size), unit="batch"):
            img, m = (x.to(device) for x in pairs.get(i, min(n, i + batch_size)))
            b = len(img)
            roll = (lambda x: x.roll(1, 0)) if b > 1 else (lambda x: x.flip(-1).flip(-2))
            img_mix, m_mix = erase_lesions(img, m)
            text = text_1.expand(b, -1, -1)
            condition = lambda x, c: in_chunks(lambda *a: encode_condition(diffusion, *a), x, c)  # noqa: E731
            z0, *cond_true = condition(img, m)
            cond_other = condition(img, roll(m))[1:]
            z0_mix, *cond_mix = condition(img_mix, m)
            cond_true, cond_other, cond_mix = ([*c, text] for c in (cond_true, cond_other, cond_mix))
            if writer is None:
                writer = BankWriter(folder, n * (3 + per_image), tuple(z0.shape[1:]), _mask_rows(n, batch_size),
                                    tuple(m.shape[-2:]))
            own, mix = writer.add_masks(m) + torch.arange(b), writer.add_masks(m_mix) + torch.arange(b)
            other = own.roll(1, 0) if b > 1 else torch.full((1,), writer.add_masks(roll(m)))
            # (latent, condition, truth, claimed mask): a good sample, a misplaced and a missing lesion
            variants = [(z0, cond_true, own, own), (z0, cond_other, own, other), (z0_mix, cond_mix, mix, own)]
            zeros = torch.zeros(b, dtype=torch.long)
            for zc, _, truth, claimed in variants:
                writer.add_items(zc, zeros, zc, truth, claimed)
            for j in range(per_image):
                t = t_focus[j % len(t_focus)] if j % 2 == 0 else int(torch.randint(1, t_hi, (), generator=gen))
                tt = torch.full((b,), int(t), dtype=torch.long, device=device)
                zc, cond, truth, claimed = variants[j % 3]
                eps = torch.randn(zc.shape, generator=gen).to(zc.device, zc.dtype)
                z_t = add_noise(zc, eps, ac, tt)
                eps_hat = in_chunks(diffusion.predict_eps, z_t, tt, *cond)
                writer.add_items(estimate_z0(z_t, eps_hat, ac, tt), tt, zc, truth, claimed)
    return writer.close()


def erase_lesions(images: torch.Tensor, masks: torch.Tensor):
    """Real images (N,3,H,W) with each lesion (dilated) replaced by lesion-free pixels of another image.

    The donor is the first other image, shifted by half the size along width, height or both, whose
    lesions do not touch the region. Claiming the original masks (N,H,W) for the result is what a
    "missing lesion" sample is.

    Returns:
        ``(images (N,3,H,W), true masks (N,H,W))``; the true masks are empty in the region unless no
        lesion-free donor existed.
    """
    pad = max(1, images.shape[-1] // 16)
    lesion = (masks > 0).float()[:, None]
    region = F.max_pool2d(lesion, 2 * pad + 1, 1, pad).bool()
    h, w = images.shape[-2:]
    out, truth = images.clone(), masks.clone()
    for i in range(len(images)):
        candidates = [(j, shift) for j in list(range(i + 1, len(images))) + list(range(i))
                      for shift in ((0, w // 2), (h // 2, 0), (h // 2, w // 2))]
        for j, shift in candidates or [(i, (h // 2, w // 2))]:
            # the donor's own dilated lesion region, shifted, must not reach into this one
            if not (region[j].roll(shift, (-2, -1)) & region[i]).any():
                break
        out[i] = torch.where(region[i], images[j].roll(shift, (-2, -1)), images[i])
        truth[i] = torch.where(region[i, 0], masks[j].roll(shift, (-2, -1)), masks[i])
    return out, truth
