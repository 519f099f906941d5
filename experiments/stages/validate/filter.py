"""Filter: the feature-space quality filter (outliers of the real distribution, near-copies of a source)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from lightning_modules.gating.quality import FeatureQualityFilter


def quality_filter(cfg, datamodule, real_images: torch.Tensor, gen, feature_fn: Optional[Callable] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Score the generated samples against the real ``train_few`` images.

    Args:
        real_images: every real image (N,3,S,S) in [0,1] (``datamodule`` order).
        gen: the generated samples (``rows``, ``images`` (n,3,S,S), ``masks`` (n,S,S)).
        feature_fn: feature extractor; default ``lightning_modules.gating.fidelity.image_features``.

    Returns:
        ``(score (n,), outlier (n,) bool, near_copy (n,) bool, metrics)``; NaN scores and no rejections
        when ``validator.quality_filter`` is off or nothing was generated.
    """
    v, n = cfg.validator, len(gen.rows)
    score = torch.full((n,), float("nan"))
    outlier = near = torch.zeros(n, dtype=torch.bool)
    if not (v.quality_filter and n):
        return score, outlier, near, {}
    idx = datamodule.split_indices
    qf = FeatureQualityFilter(feature_fn, quality_quantile=v.quality_quantile,
                              near_copy_quantile=v.near_copy_quantile).fit(real_images[idx["train_few"]])
    pos = {sid: i for i, sid in enumerate(datamodule.ids)}
    src_idx = [pos.get(r.get("source_id"), -1) for r in gen.rows]
    has_src = torch.tensor([i >= 0 for i in src_idx], dtype=torch.bool)
    rep = qf.assess(gen.images, real_images[[max(i, 0) for i in src_idx]], gen.masks, has_src)
    val = idx["val"]
    real_rate = float(qf.assess(real_images[val]).accepted.float().mean()) if len(val) else float("nan")
    return rep.score, rep.outlier, rep.near_copy, {"gen/real_quality_pass_rate": real_rate}
