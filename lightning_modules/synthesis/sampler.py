"""Guided inpainting sampler: classifier-free guidance + dynamic adaptive guiding mask.

Blended latent denoising (MedDiff-FT's dynamic adaptive guiding mask): before every UNet call,
latents outside the guiding mask are replaced by the source latents noised to the current t.
The guiding mask is the target mask dilated by ``guide_dilate_px`` at t = T and shrinks
linearly to the target mask as t -> 0, so early steps may reshape the surroundings a little
(a lesion that blends into its context) and late steps keep everything outside the mask.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

SCHEDULERS = ("ddim", "dpm")


def make_scheduler(scheduler_config: dict, kind: str = "ddim"):
    """DDIM or DPM-Solver++ (multistep) built from the base's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(scheduler_config)
    raise ValueError(f"scheduler='{kind}'; choose one of {', '.join(SCHEDULERS)}.")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation by a disk of ``radius`` pixels. mask: (B,1,H,W) in {0,1} -> same shape."""
    if radius <= 0:
        return mask.float()
    r = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2 + 1e-6).float()[None, None]
    return (F.conv2d(mask.float(), disk, padding=radius) > 0.5).float()


def guide_radius(t: int, num_train_timesteps: int, dilate_px: int) -> int:
    """Dilation radius (pixels) of the guiding mask at timestep t: ``dilate_px`` at T, 0 at 0."""
    return int(round(dilate_px * float(t) / num_train_timesteps))


def guiding_masks(mask: torch.Tensor, timesteps: Sequence[int], num_train_timesteps: int, dilate_px: int,
                  latent_size) -> list:
    """Latent-resolution guiding mask of every step.

    Args:
        mask: (B,1,H,W) target mask in {0,1}.
        timesteps: the sampler's timesteps, descending.
        latent_size: (h, w).

    Returns:
        list of (B,1,h,w) float masks, one per timestep, shrinking monotonically.
    """
    cache, out = {}, []
    for t in timesteps:
        r = guide_radius(int(t), num_train_timesteps, dilate_px)
        if r not in cache:  # a latent cell is "inside" if any of its pixels is
            cache[r] = F.adaptive_max_pool2d(dilate(mask, r), tuple(latent_size))
        out.append(cache[r])
    return out


def _drop(scheduler, keep: torch.Tensor) -> None:
    """Drop stopped samples from a multistep scheduler's history (DPM-Solver keeps ε/x0 of past steps)."""
    hist = getattr(scheduler, "model_outputs", None)
    if hist is not None:
        scheduler.model_outputs = [h[keep] if torch.is_tensor(h) else h for h in hist]


@torch.no_grad()
def _condition(model, source: torch.Tensor, m: torch.Tensor, prompts: Sequence[str],
               negative_prompts: Optional[Sequence[str]], cfg: bool) -> tuple:
    """What every step conditions on: source latents, latent mask, masked-image latents (B,C,h,w) and
    the prompt embeddings (negative ones only with guidance).

    Raises:
        ValueError: the prompts do not match the batch.
    """
    b = source.shape[0]
    prompts = list(prompts)
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * b
    if len(prompts) != b or len(negative_prompts) != b:
        raise ValueError(f"{b} images but {len(prompts)} prompts / {len(negative_prompts)} negative prompts.")
    z_src = model.encode_images(source)
    masked_lat = model.encode_masked(source, m)
    mask_lat = model.mask_to_latent(m, z_src.shape[-2:])
    cond = model.encode_prompts(prompts)
    neg = model.encode_prompts(negative_prompts) if cfg else None
    return z_src, mask_lat, masked_lat, cond, neg


def _guided_eps(model, zin: torch.Tensor, t: int, mask_lat: torch.Tensor, masked_lat: torch.Tensor,
                cond: torch.Tensor, neg: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    """ε̂ of the active rows (B,C,h,w): classifier-free guided when ``neg`` is given, in one batched UNet
    call ``[negative; conditional]``; the conditional prediction alone otherwise."""
    if neg is None:
        return model.predict_eps(zin, t, mask_lat, masked_lat, cond)
    e = model.predict_eps(torch.cat([zin, zin]), t, torch.cat([mask_lat] * 2), torch.cat([masked_lat] * 2),
                          torch.cat([neg, cond]))
    e_neg, e_cond = e.chunk(2)
    return e_neg + guidance_scale * (e_cond - e_neg)


def _composite(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, feather_px: int) -> torch.Tensor:
    """The decoded sample inside the mask, the source outside (B,3,H,W); feathered inward only, so
    outside the mask stays bit-exact source."""
    if feather_px > 0:
        k = 2 * feather_px + 1
        mask = mask * F.avg_pool2d(mask, k, stride=1, padding=feather_px, count_include_pad=False)
    return mask * generated + (1 - mask) * source


def inpaint(model, source: torch.Tensor, mask: torch.Tensor, prompts: Sequence[str],
            negative_prompts: Optional[Sequence[str]] = None, guidance_scale: float = 4.0, steps: int = 25,
            scheduler: str = "ddim", guiding_mask: bool = True, guide_dilate_px: int = 6,
            generator: Optional[torch.Generator] = None, step_callback: Optional[Callable] = None,
            progress: bool = True, feather_px: int = 1, return_info: bool = False):
    """Inpaint ``mask`` regions of ``source`` guided by text.

    Args:
        model: an :class:`~lightning_modules.diffusion.InpaintingDiffusion`.
        source: (B,3,H,W) in [0,1].
        mask: (B,1,H,W) or (B,H,W); > 0.5 = region to generate.
        prompts: B lesion prompts. negative_prompts: B prompts (e.g. the background prompt), default "".
        guidance_scale: CFG s in ``ε = ε_neg + s (ε_cond − ε_neg)``; s = 1 runs the conditional pass only.
        steps: sampler steps. scheduler: ``ddim`` | ``dpm``.
        guiding_mask: blend outside the (shrinking) guiding mask with the noised source latents.
        guide_dilate_px: guiding-mask dilation at t = T, in pixels.
        generator: seeds the initial and blending noise (CPU generator; samples reproducible).
        step_callback: ``f(i, t, z_t (B,C,h,w), eps_hat (B,C,h,w)) -> Optional[BoolTensor (B,)]``;
            True = stop that sample (early rejection): it gets no further UNet calls and is
            returned as ``source``. Tensors cover the whole batch; stopped rows hold stale values.
        feather_px: inward feathering of the pixel composite (outside the mask stays exactly source).
        return_info: also return ``{"stopped": (B,) bool, "stopped_at": (B,) int (-1 = ran to the end),
            "latents": (B,C,h,w) final clean latents (what was decoded; zeros for stopped rows),
            "mask_latents": (B,1,h,w), "masked_latents": (B,C,h,w)}`` (the inpainting condition), so a
            latent-space gate can reuse them without the VAE.

    Returns:
        (B,3,H,W) in [0,1], equal to ``source`` outside ``mask`` (and the info dict if asked).
    """
    dev = model.device
    source = source.to(dev, torch.float32)
    m = (mask if mask.dim() == 4 else mask[:, None]).to(dev).float().gt(0.5).float()
    b = source.shape[0]
    cfg = guidance_scale != 1.0
    z_src, mask_lat, masked_lat, cond, neg = _condition(model, source, m, prompts, negative_prompts, cfg)
    sched = make_scheduler(model.scheduler_config, scheduler)
    sched.set_timesteps(steps, device=dev)
    timesteps = [int(t) for t in sched.timesteps]
    guides = guiding_masks(m, timesteps, model.num_train_timesteps, guide_dilate_px, z_src.shape[-2:]) if guiding_mask else None
    noise_sched = model.noise_scheduler
    gen_dev = generator.device if generator is not None else torch.device("cpu")

    def randn(shape):
        return torch.randn(shape, generator=generator, device=gen_dev).to(dev)

    z = randn(z_src.shape) * sched.init_noise_sigma
    active = torch.arange(b, device=dev)
    z_full, eps_full = z.clone(), torch.zeros_like(z)
    stopped_at = torch.full((b,), -1, dtype=torch.long)
    # disable=None: tqdm draws only on a terminal; in a log file every redraw would be a line
    for i, t in enumerate(tqdm(timesteps, desc="inpaint", disable=None if progress else True, leave=False)):
        if len(active) == 0:
            break
        if guides is not None:  # blended latent denoising: outside the guide, the source at noise level t
            g = guides[i][active]
            bg = noise_sched.add_noise(z_src[active], randn(z.shape), torch.full((len(active),), t, device=dev))
            z = g * z + (1 - g) * bg
        eps = _guided_eps(model, sched.scale_model_input(z, t), t, mask_lat[active], masked_lat[active],
                          cond[active], neg[active] if cfg else None, guidance_scale)
        if step_callback is not None:
            z_full[active], eps_full[active] = z, eps
            stop = step_callback(i, t, z_full, eps_full)
            if stop is not None:
                stop = stop.to(dev).bool()[active]
                if stop.any():
                    stopped_at[active[stop].cpu()] = i
                    keep = ~stop
                    active, z, eps = active[keep], z[keep], eps[keep]
                    _drop(sched, keep)
                    if len(active) == 0:
                        break
        z = sched.step(eps, t, z).prev_sample
    out, z_final = source.clone(), torch.zeros_like(z_src)
    if len(active):
        if guides is not None:  # final blend at t = 0 with the exact (latent) target mask
            z = mask_lat[active] * z + (1 - mask_lat[active]) * z_src[active]
        z_final[active] = z
        out[active] = _composite(model.decode_latents(z).float(), source[active], m[active], feather_px)
    if return_info:
        return out, {"stopped": stopped_at >= 0, "stopped_at": stopped_at, "latents": z_final,
                     "mask_latents": mask_lat, "masked_latents": masked_lat}
    return out
