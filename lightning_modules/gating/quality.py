"""Feature-space quality assessment of generated images (MedDiff-FT, designed from the paper).

A generated image is scored by its distance to the real training images in a frozen encoder's
feature space. Two failure modes are rejected:

* **outliers**: score above the ``quality_quantile`` of the real images' own leave-one-out scores
  (the threshold is calibrated on real data, so it means "less typical than 95 % of real images");
* **near-copies of their source**: (almost) no pixel change inside the intended mask — the model
  returned its input instead of painting a lesion. Only when no mask is given, a feature distance
  to the source below the ``near_copy_quantile`` of real–real nearest-neighbour distances. (A
  global feature distance cannot judge a local inpainting: any image with one lesion changed is
  far closer to its source than two distinct real images are to each other; in the first grid it
  flagged 80–100 % of diffusion and copy-paste samples as copies.)

Scores: ``knn`` = mean distance to the k nearest reals in standardised feature space;
``mahalanobis`` = distance to the real mean under a Ledoit–Wolf shrinkage covariance (D ≫ N in the
few-shot regime, so the sample covariance alone is singular).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def default_feature_fn() -> FeatureFn:
    """``lightning_modules.gating.fidelity.image_features``, or a pixel-statistics fallback.

    Imported lazily: fidelity.py is written beside this module and may be absent in old checkouts.
    """
    try:
        from lightning_modules.gating.fidelity import image_features
        return image_features
    except ImportError:
        warnings.warn("lightning_modules.gating.fidelity is unavailable; the quality filter falls back "
                      "to pooled pixel/gradient statistics as features.", stacklevel=2)
        return pixel_stat_features


@torch.no_grad()
def pixel_stat_features(images: torch.Tensor) -> torch.Tensor:
    """Cheap deterministic features: 4x4-pooled colour, colour moments and gradient energy.

    Args:
        images: (N,3,H,W) float in [0,1].

    Returns:
        (N, 3*16 + 3*2 + 3) float features.
    """
    x = images.float()
    pooled = F.adaptive_avg_pool2d(x, 4).flatten(1)
    moments = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    grad = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((2, 3))
    return torch.cat([pooled, moments, grad], 1)


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit–Wolf shrinkage covariance (D,D) of samples x (N,D)."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    delta = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    # Σ_i ||x_i x_iᵀ − S||²_F expanded, so no (N,D,D) tensor is formed
    sq = (xc * xc).sum(1)
    beta = (sq.pow(2) - 2 * ((xc @ s) * xc).sum(1)).sum() + n * (s * s).sum()
    beta = beta / (n * n * d)
    shrink = torch.clamp(beta / delta.clamp(min=1e-12), 0.0, 1.0)
    return shrink * mu * torch.eye(d, dtype=x.dtype) + (1 - shrink) * s


@dataclass
class QualityReport:
    """Per-image verdicts of :meth:`FeatureQualityFilter.assess` (tensors of length N)."""

    score: torch.Tensor  # (N,) feature-space distance to the real set (higher = less typical)
    outlier: torch.Tensor  # (N,) bool: score > threshold
    near_copy: torch.Tensor  # (N,) bool
    source_distance: torch.Tensor  # (N,) feature distance to own source (nan: no source)
    pixel_change: torch.Tensor  # (N,) mean |gen - source| inside the mask (nan: no source)
    threshold: float
    near_copy_threshold: float

    @property
    def accepted(self) -> torch.Tensor:
        """(N,) bool: neither outlier nor near-copy."""
        return ~(self.outlier | self.near_copy)


class FeatureQualityFilter:
    """Fit on real images, then score and filter generated ones.

    Args:
        feature_fn: ``images (N,3,H,W) [0,1] -> (N,D)``; default :func:`default_feature_fn`.
        metric: ``"knn"`` or ``"mahalanobis"``.
        k: neighbours for the kNN score.
        quality_quantile: real leave-one-out score quantile above which an image is an outlier.
        near_copy_quantile: quantile of real–real nearest distances below which a generated image is
            a near-copy of its source.
        min_pixel_change: mean absolute change inside the mask (intensity in [0,1]) under which the
            mask region counts as unchanged.
        batch_size: images per feature_fn call.
    """

    def __init__(self, feature_fn: Optional[FeatureFn] = None, metric: str = "knn", k: int = 3,
                 quality_quantile: float = 0.95, near_copy_quantile: float = 0.02,
                 min_pixel_change: float = 2.0 / 255, batch_size: int = 32):
        if metric not in ("knn", "mahalanobis"):
            raise ValueError(f"metric '{metric}' is not one of knn, mahalanobis")
        self.feature_fn = feature_fn or default_feature_fn()
        self.metric, self.k, self.batch_size = metric, k, batch_size
        self.quality_quantile, self.near_copy_quantile = quality_quantile, near_copy_quantile
        self.min_pixel_change = min_pixel_change

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features (N,D) (standardised by the real set once fitted)."""
        feats = torch.cat([self.feature_fn(images[i:i + self.batch_size]).detach().float().cpu()
                           for i in range(0, len(images), self.batch_size)])
        if hasattr(self, "mean_"):
            feats = (feats - self.mean_) / self.std_
        return feats

    def fit(self, real_images: torch.Tensor) -> "FeatureQualityFilter":
        """Calibrate thresholds on real images (N,3,H,W) in [0,1]; needs N >= 3."""
        if len(real_images) < 3:
            raise ValueError(f"the quality filter needs at least 3 real images to calibrate, got {len(real_images)}")
        raw = self.features(real_images)
        # standardise so no feature dimension dominates the Euclidean distance by its scale alone
        self.mean_, self.std_ = raw.mean(0), raw.std(0).clamp(min=1e-6)
        self.real_ = (raw - self.mean_) / self.std_
        n = len(self.real_)
        self.k_ = max(1, min(self.k, n - 1))
        loo = torch.stack([self._score(self.real_[i:i + 1], exclude=i) for i in range(n)]).reshape(-1)
        self.real_scores_ = loo
        self.threshold_ = float(torch.quantile(loo, self.quality_quantile))
        d = torch.cdist(self.real_, self.real_)
        d.fill_diagonal_(float("inf"))
        self.real_nn_ = d.min(1).values
        self.near_copy_threshold_ = float(torch.quantile(self.real_nn_, self.near_copy_quantile))
        return self

    def _score(self, feats: torch.Tensor, exclude: Optional[int] = None) -> torch.Tensor:
        ref = self.real_ if exclude is None else torch.cat([self.real_[:exclude], self.real_[exclude + 1:]])
        if self.metric == "knn":
            return torch.cdist(feats, ref).topk(self.k_, dim=1, largest=False).values.mean(1)
        cov = ledoit_wolf(ref.double())
        diff = (feats.double() - ref.double().mean(0))
        return (diff @ torch.linalg.solve(cov, diff.T)).diagonal().clamp(min=0).sqrt().float()

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Distance of images (N,3,H,W) to the real set, (N,)."""
        return self._score(self.features(images))

    @torch.no_grad()
    def assess(self, images, sources=None, masks=None, has_source: Optional[torch.Tensor] = None) -> QualityReport:
        """Score generated images and flag outliers and near-copies, ``batch_size`` rows at a time.

        Args:
            images: generated (N,3,H,W) in [0,1], a tensor or a row view (``images[i:j]`` a tensor).
            sources: source image of each (N,3,H,W) (tensor or row view), or None to skip the near-copy test.
            masks: intended masks (N,H,W) (pixel-change test inside them; tensor or row view), or None.
            has_source: (N,) bool, False where ``sources`` holds a placeholder.
        """
        parts = [self._assess_batch(images[i:j], None if sources is None else sources[i:j],
                                    None if masks is None else masks[i:j],
                                    None if has_source is None else has_source[i:j])
                 for i, j in ((i, min(i + self.batch_size, len(images))) for i in range(0, len(images), self.batch_size))]
        if not parts:
            empty = torch.zeros(0)
            return QualityReport(empty, empty.bool(), empty.bool(), empty, empty, self.threshold_,
                                 self.near_copy_threshold_)
        score, outlier, near, src_d, change = (torch.cat(p) for p in zip(*parts))
        return QualityReport(score, outlier, near, src_d, change, self.threshold_, self.near_copy_threshold_)

    def _assess_batch(self, images: torch.Tensor, sources: Optional[torch.Tensor], masks: Optional[torch.Tensor],
                      has_source: Optional[torch.Tensor]) -> tuple:
        """:meth:`assess` on one batch: ``(score, outlier, near_copy, source_distance, pixel_change)``, each (B,)."""
        feats = self.features(images)
        score = self._score(feats)
        n = len(images)
        src_d = torch.full((n,), float("nan"))
        change = torch.full((n,), float("nan"))
        near = torch.zeros(n, dtype=torch.bool)
        if sources is not None:
            ok = torch.ones(n, dtype=torch.bool) if has_source is None else has_source.bool()
            src_d = torch.where(ok, (feats - self.features(sources)).norm(dim=1), src_d)
            if masks is None:  # no region known: judge by global feature distance to the source
                near |= ok & (src_d < self.near_copy_threshold_)
            else:  # a local inpainting is always far closer to its source than two distinct reals
                # are to each other, so only the change inside the painted region can tell a copy
                fg = (masks > 0).float()[:, None]
                diff = ((images.float() - sources.float()).abs() * fg).sum((1, 2, 3))
                change = torch.where(ok & (fg.sum((1, 2, 3)) > 0), diff / (3 * fg.sum((1, 2, 3))).clamp(min=1), change)
                near |= change < self.min_pixel_change  # nan compares False
        return score, score > self.threshold_, near, src_d, change
