"""Filter: the feature-space quality filter (outliers of the real distribution, near-copies of a source)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from lightning_modules.gating.quality import FeatureQualityFilter

FEATURES = ("random_resnet18", "vae")  # validator.quality_features


def feature_extractor(cfg, diffusion_fn: Callable) -> Tuple[Optional[Callable], str]:
    """The filter's ``images (N,3,H,W) -> (N,D)`` features named by ``validator.quality_features``.

    ``random_resnet18``: the fixed, randomly initialised resnet18 of ``gating.fidelity`` (no domain
    knowledge; the old default). ``vae``: pooled statistics of the diffusion model's VAE latents
    (``gating.vae_features``); ``diffusion_fn()`` returns that model (loaded only when asked).
    """
    kind = str(cfg.validator.get("quality_features", "random_resnet18"))
    if kind == "vae":
        from lightning_modules.gating.vae_features import vae_feature_fn
        return vae_feature_fn(diffusion_fn()), kind
    if kind != "random_resnet18":
        raise ValueError(f"validator.quality_features is '{kind}'; choose one of {', '.join(FEATURES)}")
    return None, kind  # FeatureQualityFilter's default: gating.fidelity.image_features


def quality_filter(cfg, datamodule, real_images: torch.Tensor, gen, feature_fn: Optional[Callable] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Score the generated samples against the real ``train_few`` images.

    The filter is fitted on the real ``train_few`` images; the real ``val`` images (never used to fit
    it) measure how often it rejects a real image: ``gen/quality_real_reject_rate``, which should sit
    near its nominal ``1 − validator.quality_quantile`` (far above it: the filter rejects what is real).

    Args:
        real_images: every real image (N,3,S,S) in [0,1] (``datamodule`` order), a
            :class:`~datamodules.rows.LazyRows` view: the filter reads a batch of rows at a time.
        gen: the generated samples (``rows``, ``images`` (n,3,S,S), ``masks`` (n,S,S) row views).
        feature_fn: feature extractor; default ``lightning_modules.gating.fidelity.image_features``.

    Returns:
        ``(score (n,), outlier (n,) bool, near_copy (n,) bool, metrics)``; NaN scores and no rejections
        when ``validator.quality_filter`` is off or nothing was generated. ``metrics``:
        ``gen/real_quality_pass_rate`` (real val images neither outlier nor near-copy) and
        ``gen/quality_real_reject_rate`` (real val images rejected as outliers).
    """
    v, n = cfg.validator, len(gen.rows)
    score = torch.full((n,), float("nan"))
    outlier = near = torch.zeros(n, dtype=torch.bool)
    if not (v.quality_filter and n):
        return score, outlier, near, {}
    idx = datamodule.split_indices
    qf = FeatureQualityFilter(feature_fn, quality_quantile=v.quality_quantile,
                              near_copy_quantile=v.near_copy_quantile).fit(real_images.take(idx["train_few"]))
    pos = {sid: i for i, sid in enumerate(datamodule.ids)}
    src_idx = [pos.get(r.get("source_id"), -1) for r in gen.rows]
    has_src = torch.tensor([i >= 0 for i in src_idx], dtype=torch.bool)
    rep = qf.assess(gen.images, real_images.take([max(i, 0) for i in src_idx]), gen.masks, has_src)
    fitted = set(idx["train_few"])
    held_out = [i for i in idx["val"] if i not in fitted]
    if not held_out:
        return rep.score, rep.outlier, rep.near_copy, {"gen/real_quality_pass_rate": float("nan"),
                                                       "gen/quality_real_reject_rate": float("nan")}
    real = qf.assess(real_images.take(held_out))
    return rep.score, rep.outlier, rep.near_copy, {
        "gen/real_quality_pass_rate": float(real.accepted.float().mean()),
        "gen/quality_real_reject_rate": float(real.outlier.float().mean())}
