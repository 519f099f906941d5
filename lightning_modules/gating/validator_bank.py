"""Training items of the latent validator, made from the real pairs (clean latents and ẑ0 estimates).

Pure functions of the diffusion model and the real pairs (no config): the gate training of the
pipeline (:mod:`experiments.gate_training`) and the gate sanity check both use them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.gating.latent_gate import add_noise, encode_condition, encode_prompt, estimate_z0


def build_validator_bank(diffusion, images: torch.Tensor, masks: torch.Tensor, prompt: str, t_focus: list,
                      per_image: int = 9, batch_size: int = 16, seed: int = 0) -> dict:
    """Validator training items from real pairs: clean latents and single-step ẑ0 estimates.

    The inpainting condition makes ε̂ worse inside the conditioning mask, and every real image holds a
    lesion; a validator trained only on (image, own mask) learns "blurry region = lesion" and passes
    samples whose lesion is missing. So the estimates cycle through three conditions:

    * the pair itself, conditioned on its own mask (what a good sample looks like);
    * conditioned on another pair's mask (a clean lesion outside the mask: a *misplaced* lesion);
    * "erased": the lesion region (dilated) replaced by lesion-free pixels of another image
      (:func:`erase_lesions`), conditioned on the original mask (a *missing* lesion).

    Timesteps alternate between the gate's ``t_focus`` and draws in ``[1, 1.5·max(t_focus)]``.

    Args:
        images: (N,3,H,W) in [0,1] on the diffusion's device.
        masks: (N,H,W) int64 class indices.

    Returns:
        dict of CPU tensors ``x (M,C,h,w)``, ``t (M,)``, ``z0 (M,C,h,w)``, ``mask (M,H,W)`` (the truth) and
        ``prompt (M,H,W)`` (the mask the sample claims: its own, another pair's, or the erased one's).
    """
    gen = torch.Generator().manual_seed(seed)
    T = int(diffusion.num_train_timesteps)
    t_hi = max(2, min(T - 1, int(1.5 * max(t_focus))))
    out = {"x": [], "t": [], "z0": [], "mask": [], "prompt": []}

    def add(x, t, z0, m, prompt):
        for key, value in zip(out, (x, t, z0, m, prompt)):
            out[key].append(value.cpu())

    with torch.no_grad():
        text_1 = encode_prompt(diffusion, prompt)  # (1,L,D): one prompt for every pair
        for i in range(0, len(images), batch_size):
            img, m = images[i:i + batch_size], masks[i:i + batch_size].to(images.device)
            roll = (lambda x: x.roll(1, 0)) if len(m) > 1 else (lambda x: x.flip(-1).flip(-2))
            img_mix, m_mix = erase_lesions(img, m)
            text = text_1.expand(len(img), -1, -1)
            z0, *cond_true = encode_condition(diffusion, img, m)
            cond_other = encode_condition(diffusion, img, roll(m))[1:]
            z0_mix, *cond_mix = encode_condition(diffusion, img_mix, m)
            cond_true, cond_other, cond_mix = ([*c, text] for c in (cond_true, cond_other, cond_mix))
            # (latent, condition, truth, claimed mask): a good sample, a misplaced and a missing lesion
            variants = [(z0, cond_true, m, m), (z0, cond_other, m, roll(m)), (z0_mix, cond_mix, m_mix, m)]
            ac = diffusion.alphas_cumprod.to(z0.device)
            zeros = torch.zeros(len(img), dtype=torch.long)
            add(z0, zeros, z0, m, m), add(z0, zeros, z0, m, roll(m)), add(z0_mix, zeros, z0_mix, m_mix, m)
            for j in range(per_image):
                t = t_focus[j % len(t_focus)] if j % 2 == 0 else int(torch.randint(1, t_hi, (), generator=gen))
                tt = torch.full((len(img),), int(t), dtype=torch.long, device=z0.device)
                zc, cond, target, claimed = variants[j % 3]
                eps = torch.randn(zc.shape, generator=gen).to(zc.device, zc.dtype)
                z_t = add_noise(zc, eps, ac, tt)
                add(estimate_z0(z_t, diffusion.predict_eps(z_t, tt, *cond), ac, tt), tt, zc, target, claimed)
    return {k: torch.cat(v) for k, v in out.items()}


def augmented_copies(images: torch.Tensor, masks: torch.Tensor, copies: int, seed: int = 0):
    """The real pairs plus ``copies - 1`` randomly transformed versions of each (the standard preset).

    The validator sees 16 pairs in the few-shot setting; transformed copies, encoded by the VAE like
    any image, give it more lesion shapes, positions and colours than 16 latents do.

    Args:
        images: (N,3,H,W) in [0,1].
        masks: (N,H,W) int64.

    Returns:
        ``(images (N·copies,3,H,W), masks (N·copies,H,W))`` on the inputs' device; originals first.
    """
    from datamodules.base import build_transforms

    if copies <= 1:
        return images, masks
    transform = build_transforms("standard", seed=seed)
    rng = np.random.default_rng(seed)
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    labels = masks.cpu().numpy().astype(np.uint8)
    out_img, out_msk = [images.cpu()], [masks.cpu()]
    for _ in range(copies - 1):
        for image, label in zip(arrays, labels):
            # albumentations draws from its own global RNG; seeding it per item keeps the bank reproducible
            transform.set_random_seed(int(rng.integers(2**31)))
            t = transform(image=image, mask=label)
            out_img.append(torch.from_numpy(t["image"]).permute(2, 0, 1)[None].float() / 255.0)
            out_msk.append(torch.from_numpy(t["mask"].astype(np.int64))[None])
    return torch.cat(out_img).to(images.device), torch.cat(out_msk).to(masks.device)


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
