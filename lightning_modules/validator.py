"""Latent validator: a small segmenter on VAE latents that gates synthetic image–mask pairs (DiffAug).

The validator sees a latent ``x`` (B,C,h,w) and the timestep ``t`` it came from and predicts the
lesion mask at latent resolution, upsampled bilinearly (as logits) to image resolution. It is
trained on the real few-shot pairs' latents in three forms, so it meets at validation the kind of
input it is given there:

* clean latents ``z0`` (``t = 0``),
* single-step clean-latent estimates ``ẑ0 = (z_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t`` from the diffusion model's ε̂,
* noised latents ``z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε`` (drawn on the fly; flagged as "noisy" so the network
  never confuses them with estimates at the same ``t``).

The gate math (single-step ẑ0, full DDIM denoise, IoU, early-reject callback) lives in
``lightning_modules.gating.latent_gate`` and is re-exported here.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.gating.latent_gate import add_noise



def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B,dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class _FiLMBlock(nn.Module):
    """Two 3x3 convs with GroupNorm; the (t, kind) embedding scales and shifts the first."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(8, cout), cout)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm1(self.conv1(x)) * (1 + scale) + shift)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class LatentSegNet(nn.Module):
    """Compact two-level U-Net on latents with timestep FiLM.

    Compact rather than ``smp.Unet``: latents are 8–64 px, where smp's 5-level encoders would reduce
    the map to a single pixel; two levels keep a receptive field over the whole 16x16 latent.

    Args:
        in_channels: latent channels C.
        out_channels: 1 for binary (sigmoid), K for K-class softmax.
        width: channels of the first level (the second has 2x).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 1, width: int = 32, prompt_channels: int = 0):
        super().__init__()
        emb = 4 * width
        self.width = width
        self.prompt_channels = prompt_channels
        # kind 0 = clean latent or clean-latent estimate, 1 = raw noisy latent z_t
        self.kind_emb = nn.Embedding(2, emb)
        self.t_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(in_channels + prompt_channels, width, 3, padding=1)
        self.enc1 = _FiLMBlock(width, width, emb)
        self.enc2 = _FiLMBlock(width, 2 * width, emb)
        self.mid = _FiLMBlock(2 * width, 2 * width, emb)
        self.dec1 = _FiLMBlock(3 * width, width, emb)
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, kind: torch.Tensor,
                prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits at latent resolution (B,out,h,w) for latents (B,C,h,w), t (B,), kind (B,).

        ``prompt`` (B,prompt_channels,h,w) is the intended mask at latent size (prompted validators).
        """
        emb = self.t_mlp(timestep_embedding(t, self.width)) + self.kind_emb(kind.long())
        if self.prompt_channels:
            x = torch.cat([x, prompt], 1)
        h1 = self.enc1(self.inp(x), emb)
        # ceil-mode pooling and a size-matched upsample keep odd latent sizes working
        h2 = self.mid(self.enc2(F.max_pool2d(h1, 2, ceil_mode=True), emb), emb)
        up = F.interpolate(h2, size=h1.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.dec1(torch.cat([h1, up], 1), emb))


class LatentValidator(L.LightningModule):
    """Latent-space segmenter used as the DiffAug quality gate.

    Batches are dicts ``{"x": (B,C,h,w) clean latent or ẑ0, "t": (B,) its timestep, "z0": (B,C,h,w)
    clean latent of the same pair, "mask": (B,H,W) int64}`` (see :func:`lightning_modules.gating.validator_bank.build_validator_bank`).

    Args:
        in_channels: latent channels C.
        num_classes: classes including background; 2 = binary (one sigmoid logit).
        width: network width.
        lr: AdamW learning rate (cosine decay to 5 %).
        train_steps: optimisation steps (sets the schedule length).
        num_train_timesteps: T of the diffusion schedule.
        alphas_cumprod: ᾱ (T,) for the on-the-fly noised inputs; stored in the checkpoint.
        noisy_fraction: share of each batch replaced by raw noisy latents z_t.
        noisy_t_max: largest t for those (defaults to T // 2: larger t carries no lesion shape).
        flip: random horizontal/vertical flips (and 90° turns of square latents) of latent and mask together.
        prompted: the network also sees the intended mask (at latent size) and answers where the lesion
            really is. Trained on real pairs with the true mask, another pair's mask (misplaced lesion) and
            an erased lesion (missing lesion), so copying the prompt is penalised; with 16 labelled pairs this
            verification task generalises far better than segmenting from scratch (see docs/gate.md).
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 2, width: int = 32, lr: float = 1e-3,
                 train_steps: int = 300, num_train_timesteps: int = 1000, alphas_cumprod: Optional[torch.Tensor] = None,
                 noisy_fraction: float = 0.25, noisy_t_max: Optional[int] = None, flip: bool = True,
                 prompted: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["alphas_cumprod"])
        self.binary = num_classes <= 2
        self.prompted = prompted
        self.net = LatentSegNet(in_channels, 1 if self.binary else num_classes, width, 1 if prompted else 0)
        ac = alphas_cumprod if alphas_cumprod is not None else torch.ones(num_train_timesteps)
        self.register_buffer("alphas_cumprod", ac.detach().float().clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor, out_size: Optional[Sequence[int]] = None,
                kind: Optional[torch.Tensor] = None, prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mask logits (B,K,H,W) at ``out_size`` (default: latent size) for latents x (B,C,h,w).

        ``prompt`` (B,H,W) class-index intended masks at image size; required when ``prompted``.
        """
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
        kind = torch.zeros_like(t) if kind is None else kind
        prompt_lat = None
        if self.prompted:
            if prompt is None:
                raise ValueError("this latent validator is prompted (validator.prompted=true): pass the "
                                 "intended masks as prompt=(B,H,W)")
            # area pooling keeps thin and small lesions as fractional coverage instead of dropping them
            fg = (prompt.to(x.device) > 0).float()[:, None]
            prompt_lat = F.adaptive_avg_pool2d(fg, x.shape[-2:])
        logits = self.net(x, t, kind, prompt_lat)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict_masks(self, x: torch.Tensor, t, out_size: Sequence[int],
                      prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-index masks (B,H,W) int64 for clean latents / estimates x (B,C,h,w) at timestep t.

        ``prompt``: the intended masks (B,H,W); used by prompted validators, ignored otherwise.
        """
        logits = self(x.to(self.device, torch.float32), t, out_size, prompt=prompt)
        if self.binary:
            return (logits[:, 0] > 0).long()
        return logits.argmax(1)

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Dice handles the small-lesion class imbalance; BCE/CE keeps gradients well-behaved early on
        if self.binary:
            target = (mask > 0).float()
            prob = logits[:, 0].sigmoid()
            bce = F.binary_cross_entropy_with_logits(logits[:, 0], target)
            inter = (prob * target).flatten(1).sum(1)
            dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
            return bce + dice.mean()
        prob = logits.softmax(1)
        onehot = F.one_hot(mask, logits.shape[1]).permute(0, 3, 1, 2).float()
        inter = (prob * onehot).sum((2, 3))
        dice = 1 - (2 * inter + 1) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + 1)
        return F.cross_entropy(logits, mask) + dice[:, 1:].mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, t, z0, mask = batch["x"], batch["t"].long(), batch["z0"], batch["mask"].long()
        kind = torch.zeros_like(t)
        n_noisy = int(round(self.hparams.noisy_fraction * x.shape[0]))
        if n_noisy:
            # fresh noise every step: the bank only holds clean latents and ε̂-estimates
            t_max = self.hparams.noisy_t_max or self.hparams.num_train_timesteps // 2
            tn = torch.randint(0, t_max, (n_noisy,), device=x.device)
            zt = add_noise(z0[:n_noisy], torch.randn_like(z0[:n_noisy]), self.alphas_cumprod, tn)
            x = torch.cat([zt, x[n_noisy:]])
            t = torch.cat([tn, t[n_noisy:]])
            kind = torch.cat([torch.ones_like(tn), kind[n_noisy:]])
        prompt = batch.get("prompt")
        if self.hparams.flip:
            # latents of a conv VAE flip and turn with the image, so these are label-preserving augmentations
            x, mask, prompt = _random_flips(x, mask, prompt)
        loss = self._loss(self(x, t, mask.shape[-2:], kind, prompt), mask)
        self.log("validator/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self.parameters(), self.hparams.lr, 1e-4, self.hparams.train_steps)


def adamw_cosine(parameters, lr: float, weight_decay: float, steps: int) -> dict:
    """AdamW with the learning rate decayed on a cosine to 5 % over ``steps`` (Lightning's optimizer dict)."""
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    steps = max(1, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _random_flips(x: torch.Tensor, mask: torch.Tensor, prompt: Optional[torch.Tensor]):
    """The same random flips (and 90° turn, when square) of latents (B,C,h,w) and masks (B,H,W)."""
    ops = []
    if torch.rand(()) < 0.5:
        ops.append(lambda a: a.flip(-1))
    if torch.rand(()) < 0.5:
        ops.append(lambda a: a.flip(-2))
    if x.shape[-1] == x.shape[-2] and mask.shape[-1] == mask.shape[-2] and torch.rand(()) < 0.5:
        ops.append(lambda a: a.transpose(-1, -2))
    for op in ops:
        x, mask = op(x), op(mask)
        prompt = None if prompt is None else op(prompt)
    return x, mask, prompt
