"""The diffusion UNet's decoder features from the single-step gate's one ε̂ call.

Pixel classifiers on a diffusion model's decoder activations learn segmentation from a few dozen labelled
images (Baranchuk et al., ICLR 2022, "Label-Efficient Semantic Segmentation with Diffusion Models"). The
single-step gate already calls the UNet once per sample at ``t_eval``; forward hooks on its up blocks keep
what that call computes, so the feature validator costs no further UNet call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lightning_modules.gating.batching import EPS_BATCH
from lightning_modules.gating.latent_gate import _noised, _text


def decoder_blocks(diffusion):
    """The UNet's up blocks (diffusers ``UNet2DConditionModel.up_blocks``); a clear error without them."""
    blocks = getattr(getattr(diffusion, "unet", None), "up_blocks", None)
    if not blocks:
        raise ValueError("validator.features=unet_decoder needs a diffusers UNet with up_blocks "
                         f"(diffusion.base_model); {type(diffusion).__name__} has none")
    return list(blocks)


@torch.no_grad()
def unet_features(diffusion, z0: torch.Tensor, mask_lat: torch.Tensor, masked_lat: torch.Tensor,
                  text: torch.Tensor, t: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Noise ``z0`` to ``t`` (the noise :func:`~lightning_modules.gating.latent_gate.single_step_z0` draws)
    and return the features of one ε̂ call.

    Args:
        z0: clean latents (B,C,h,w). mask_lat: (B,1,h,w). masked_lat: (B,C,h,w). text: (1,L,D) or (B,L,D).

    Returns:
        (B, F, h, w) float32: every up block's output resized to the latent grid (bilinear), then z_t and
        the condition mask; F = the up blocks' channels + C + 1.
    """
    z_t, _ = _noised(diffusion, z0, t, generator)
    kept: list = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: kept.append(out if torch.is_tensor(out) else out[0]))
             for block in decoder_blocks(diffusion)]
    parts = []
    try:
        for i in range(0, len(z0), EPS_BATCH):
            rows = slice(i, i + EPS_BATCH)
            kept.clear()
            tt = torch.full((len(z_t[rows]),), int(t), device=z0.device, dtype=torch.long)
            diffusion.predict_eps(z_t[rows], tt, mask_lat[rows], masked_lat[rows], _text(text, len(z_t[rows])))
            size = tuple(z0.shape[-2:])
            parts.append(torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False)
                                    for f in kept] + [z_t[rows].float(), mask_lat[rows].float()], 1))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(parts)
