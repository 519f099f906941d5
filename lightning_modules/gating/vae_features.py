"""Domain features for the quality filter: pooled statistics of the diffusion model's VAE latents.

The quality filter's default encoder is a *randomly initialised* resnet18
(:mod:`lightning_modules.gating.fidelity`): consistent, but it never saw an image of the domain. The
diffusion model's VAE did: the shipped tiny base's VAE was pretrained on the four procedural
modalities, a user's SD checkpoint on a large image corpus, and its latents are exactly what the
diffusion model learns to produce. Pooled statistics of those latents (per channel: mean, spread,
texture energy, and a coarse 2×2 layout) describe an image's colour, texture and layout in a space
that knows the domain, with few dimensions (good for a k-NN score fitted on a few real images).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from lightning_modules.gating.batching import in_chunks


def latent_stat_features(latents: torch.Tensor) -> torch.Tensor:
    """Pooled statistics of latents.

    Args:
        latents: (N,C,h,w) VAE latents.

    Returns:
        (N, 7·C) float32: per channel the mean, standard deviation, mean absolute spatial gradient
        (texture) and the four 2×2-pooled means (coarse layout: a fundus disc, an ultrasound fan).
    """
    z = latents.float()
    grad = (z[..., 1:, :] - z[..., :-1, :]).abs().mean((2, 3)) + (z[..., 1:] - z[..., :-1]).abs().mean((2, 3))
    layout = F.adaptive_avg_pool2d(z, 2).flatten(1)
    return torch.cat([z.mean((2, 3)), z.std((2, 3)), grad, layout], 1)


def vae_feature_fn(diffusion) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images (N,3,H,W) [0,1] -> (N, 7·C)`` features from ``diffusion.encode_images`` (posterior mean).

    Args:
        diffusion: any object with the CONTRACTS ``encode_images`` (the fine-tuned or base model; the
            VAE is frozen in every fine-tune, so both give the same features).
    """
    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        # the quality filter passes 32 images per call; the VAE sees ENCODE_BATCH at a time (its activations)
        latents = in_chunks(lambda x: diffusion.encode_images(x).detach().float().cpu(), images)
        return latent_stat_features(latents)

    return features
