"""An ensemble of latent validators: the mean of their lesion probabilities, thresholded at 0.5.

Cross-fitting (:mod:`lightning_modules.gating.crossfit`) trains K validators, each on K−1 folds of the
labelled pairs; together they have seen every labelled pair, and averaging them cancels some of
what any one learned from its few pairs by chance.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class EnsembleValidator:
    """``predict_masks`` of the mean probability of ``members`` (LatentValidator-like, all of one kind).

    Args:
        members: validators with ``forward(x, t, out_size, prompt=...) -> logits (B,K,H,W)`` and
            ``binary`` / ``prompted`` attributes.
    """

    def __init__(self, members: Sequence):
        if not members:
            raise ValueError("an ensemble needs at least one validator")
        self.members = list(members)
        self.binary = bool(self.members[0].binary)
        self.prompted = bool(getattr(self.members[0], "prompted", False))
        self.uses_unet_features = bool(getattr(self.members[0], "uses_unet_features", False))

    def to(self, device):
        self.members = [m.to(device) for m in self.members]
        return self

    @torch.no_grad()
    def predict_masks(self, x: torch.Tensor, t, out_size: Sequence[int],
                      prompt: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-index masks (B,H,W) int64 for latents x (B,C,h,w) at timestep t."""
        probs = []
        for m in self.members:
            logits = m(x.to(m.device, torch.float32), t, out_size, prompt=prompt)
            probs.append(logits[:, 0].sigmoid() if self.binary else logits.softmax(1))
        mean = torch.stack(probs).mean(0)
        return (mean > 0.5).long() if self.binary else mean.argmax(1)

    @torch.no_grad()
    def predict_from_features(self, feats: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Class-index masks (B,H,W) int64 from UNet decoder features (members: FeatureValidator)."""
        mean = torch.stack([m.probabilities(feats, out_size) for m in self.members]).mean(0)
        return (mean > 0.5).long() if self.binary else mean.argmax(1)
