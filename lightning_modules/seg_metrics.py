"""Segmentation metrics beyond torchmetrics: pixel and lesion-level false-negative rates.

Missing a small lesion (a diminutive polyp, an early melanoma) is the clinically costly error that
Dice hides: one missed 1 % lesion barely moves a dataset's Dice. ``LesionFNR`` counts it directly.
States are sums, so the metric reduces correctly under DDP.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch
import torchmetrics
from scipy import ndimage
from torchmetrics.segmentation import DiceScore, MeanIoU


def dice_metric(num_classes: int) -> DiceScore:
    """Per-image Dice per foreground class (mDice convention), (C-1,) from ``compute()``.

    Images where a class is absent from truth and prediction give NaN and are skipped by the
    per-class mean over images, so a correctly empty normal image does not inflate the score.
    """
    return DiceScore(num_classes=max(num_classes, 2), include_background=False, average="none",
                     input_format="index")


def iou_metric(num_classes: int) -> MeanIoU:
    """Per-image IoU per foreground class, (C-1,) from ``compute()`` (-1 where never present)."""
    return MeanIoU(num_classes=max(num_classes, 2), include_background=False, per_class=True,
                   input_format="index")


def small_lesion_counts(pred: np.ndarray, target: np.ndarray, cls: int, max_area_px: float,
                        hit_fraction: float = 0.5) -> tuple[int, int]:
    """Count small truth lesions of one class and how many of them were missed.

    Args:
        pred: (H,W) predicted class indices.
        target: (H,W) true class indices.
        cls: foreground class to evaluate.
        max_area_px: a connected component of the truth with fewer pixels is "small".
        hit_fraction: a lesion counts as found when at least this share of its pixels is predicted.

    Returns:
        ``(n_small, n_missed)``.
    """
    labels, n = ndimage.label(target == cls)  # 4-connectivity: diagonal touches are separate lesions
    if n == 0:
        return 0, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hits = np.bincount(labels.ravel(), weights=(pred == cls).ravel(), minlength=n + 1)[1:]
    small = sizes < max_area_px
    missed = small & (hits < hit_fraction * sizes)
    return int(small.sum()), int(missed.sum())


class LesionFNR(torchmetrics.Metric):
    """Pixel FNR and small-lesion FNR per foreground class, accumulated over an epoch.

    Args:
        num_classes: number of classes including background (2 for binary).
        small_lesion_area: lesions under this fraction of the image area are "small".
        hit_fraction: share of a lesion's pixels that must be predicted for it to count as found.

    ``update(pred (B,H,W) int, target (B,H,W) int)``; ``compute()`` returns a dict of tensors:
    ``fnr`` and ``fnr_small`` (mean over foreground classes; NaN where a class has no positive
    pixel / no small lesion), ``n_small`` (total small lesions), and per-class ``fnr_per_class``,
    ``fnr_small_per_class`` of shape (C-1,).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_classes: int = 2, small_lesion_area: float = 0.02, hit_fraction: float = 0.5, **kw):
        super().__init__(**kw)
        self.num_fg = max(num_classes, 2) - 1
        self.small_lesion_area = small_lesion_area
        self.hit_fraction = hit_fraction
        for name in ("tp", "fn", "n_small", "n_missed"):
            self.add_state(name, default=torch.zeros(self.num_fg, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate counts of one batch: ``pred`` and ``target`` (B,H,W) class indices."""
        classes = torch.arange(1, self.num_fg + 1, device=target.device).view(1, -1, 1, 1)
        t_onehot = target.unsqueeze(1) == classes  # (B,C-1,H,W)
        p_onehot = pred.unsqueeze(1) == classes
        self.tp += (t_onehot & p_onehot).sum((0, 2, 3)).to(self.tp.dtype)
        self.fn += (t_onehot & ~p_onehot).sum((0, 2, 3)).to(self.fn.dtype)
        p_np, t_np = pred.detach().cpu().numpy(), target.detach().cpu().numpy()
        max_px = self.small_lesion_area * t_np.shape[-1] * t_np.shape[-2]
        counts = np.zeros((self.num_fg, 2))
        for b in range(t_np.shape[0]):
            for c in range(self.num_fg):
                counts[c] += small_lesion_counts(p_np[b], t_np[b], c + 1, max_px, self.hit_fraction)
        self.n_small += torch.as_tensor(counts[:, 0], device=self.n_small.device)
        self.n_missed += torch.as_tensor(counts[:, 1], device=self.n_missed.device)

    def compute(self) -> Dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.tp.device)
        pos = self.tp + self.fn
        fnr = torch.where(pos > 0, self.fn / pos.clamp_min(1), nan)
        fnr_small = torch.where(self.n_small > 0, self.n_missed / self.n_small.clamp_min(1), nan)
        return {"fnr": fnr.nanmean(), "fnr_small": fnr_small.nanmean(), "n_small": self.n_small.sum(),
                "fnr_per_class": fnr, "fnr_small_per_class": fnr_small}
