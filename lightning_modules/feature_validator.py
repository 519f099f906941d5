"""The feature validator: a pixel classifier on the diffusion UNet's decoder features (``validator.features=unet_decoder``).

It segments where the lesion really is from the features of the single-step gate's one ε̂ call
(:mod:`lightning_modules.gating.unet_features`): the UNet already sees the sample and the region it was
asked to paint, so the classifier needs no prompt. It is trained on the real pairs (and transformed
copies), each three ways: as it is, with the condition mask moved away (misplaced) and with the lesion
erased under its own mask (missing), the target always being where the lesion truly is
(:func:`lightning_modules.gating.feature_bank.build_feature_bank`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.validator import adamw_cosine


class FeatureValidator(L.LightningModule):
    """1×1 → 3×3 → 1×1 convolutions over standardised decoder features (B,F,h,w) on the latent grid.

    Args:
        in_channels: feature channels F.
        num_classes: classes including background; 2 = binary (one logit, BCE weighted by ``pos_weight``).
        lr / train_steps: AdamW learning rate (cosine decay to 5 %) and optimisation steps.
        t_eval: the timestep its features come from (the gate must use the same).
        class_weights: weight of each class's pixels in the loss, background first (the data's background :
            class pixel ratio, so small structures such as the optic cup are not drowned by background);
            binary validators use the lesion's as BCE's ``pos_weight``. None: all 1.
    """

    uses_unet_features = True  # the gate hands it features, not a latent (experiments.stages.validate.gate)
    prompted = False

    def __init__(self, in_channels: int, num_classes: int = 2, lr: float = 2e-3, train_steps: int = 300,
                 t_eval: int = 50, class_weights: Optional[Sequence[float]] = None, width: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.binary = num_classes <= 2
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(),
                                 nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width // 2, 1 if self.binary else num_classes, 1))
        # standardisation of the features (set from the training data): decoder blocks differ in scale by orders
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_std", torch.ones(in_channels))

    def forward(self, feats: torch.Tensor, out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Logits (B,K,H,W) at ``out_size`` (default: the latent grid) for features (B,F,h,w)."""
        x = (feats.float() - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]
        logits = self.net(x)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits

    def probabilities(self, feats: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Lesion probability (B,H,W) for binary validators, class probabilities (B,K,H,W) otherwise."""
        logits = self(feats.to(self.device), out_size)
        return logits[:, 0].sigmoid() if self.binary else logits.softmax(1)

    @torch.no_grad()
    def predict_from_features(self, feats: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Class-index masks (B,H,W) int64."""
        probs = self.probabilities(feats, out_size)
        return (probs > 0.5).long() if self.binary else probs.argmax(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        feats, mask = batch["feats"].float(), batch["mask"].long()
        logits = self(feats, mask.shape[-2:])
        weights = self.hparams.class_weights
        if self.binary:
            weight = torch.tensor(float(weights[1]) if weights else 1.0, device=logits.device)
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], (mask > 0).float(), pos_weight=weight)
        else:
            weight = torch.tensor(list(weights), device=logits.device, dtype=logits.dtype) if weights else None
            loss = F.cross_entropy(logits, mask, weight=weight)
        self.log("validator/loss", loss, prog_bar=True, batch_size=feats.shape[0])
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self.parameters(), self.hparams.lr, 1e-3, self.hparams.train_steps)
