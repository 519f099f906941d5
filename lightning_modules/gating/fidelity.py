"""Feature extractor and FID/KID for synthetic-image fidelity, without downloads.

Inception weights would need a download (and torch-fidelity), which the project forbids. The
feature net here is a *fixed, randomly initialised* smp ``resnet18`` encoder (seed 0 by default)
with global average pooling of its deepest stage (512-D). Random conv features are a known,
weak-but-consistent image statistic: absolute FID values are not comparable to Inception FID in
papers, but comparisons between methods/settings of this project (same seed, same net) are.
At generate time no segmenter exists yet (segment is the last stage), so the random encoder is
the default; pass ``feature_net=FeatureNet(encoder=<trained encoder>)`` to use a trained one.

torchmetrics accepts a custom ``nn.Module`` as ``feature`` and then needs no torch-fidelity
(verified for torchmetrics 1.9 without torch-fidelity installed). :func:`fid_kid` embeds each set
once with the feature net and hands the features to FID and KID through a pass-through module
that exposes ``num_features`` (so torchmetrics also skips its 299-px dummy forward).
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class FeatureNet(nn.Module):
    """Frozen image encoder -> (B, D) pooled features.

    Args:
        encoder_name: smp encoder name (used when ``encoder`` is None).
        seed: Seeds the random initialisation (the RNG state outside is left untouched).
        encoder: An already built (e.g. trained) smp encoder to use instead.
    """

    def __init__(self, encoder_name: str = "resnet18", seed: int = 0, encoder: Optional[nn.Module] = None):
        super().__init__()
        if encoder is None:
            import segmentation_models_pytorch as smp

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                encoder = smp.encoders.get_encoder(encoder_name, in_channels=3, depth=5, weights=None)
        self.encoder = encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.num_features = int(self.encoder.out_channels[-1])

    def train(self, mode: bool = True) -> "FeatureNet":
        # Stays in eval mode: BatchNorm must use its fixed statistics, whatever a caller does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,3,H,W) float in [0,1] or uint8 in [0,255] -> (B, num_features) float32."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        dev = next(self.encoder.parameters()).device
        x = (x.to(dev) - _MEAN.to(dev)) / _STD.to(dev)
        feats = self.encoder(x)[-1]
        return feats.mean(dim=(2, 3))


@lru_cache(maxsize=4)
def default_feature_net(seed: int = 0) -> FeatureNet:
    """The project's shared random resnet18 feature net (built once per seed per process)."""
    return FeatureNet(seed=seed)


ImagesLike = Union[np.ndarray, torch.Tensor]


def to_tensor(images: ImagesLike) -> torch.Tensor:
    """uint8 (N,S,S,3) numpy / float (N,3,S,S) [0,1] tensor -> float32 (N,3,S,S) in [0,1]."""
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
        if t.ndim == 4 and t.shape[-1] == 3:
            t = t.permute(0, 3, 1, 2)
    else:
        t = images
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()


def image_features(images: ImagesLike, feature_net: Optional[nn.Module] = None,
                   batch_size: int = 64) -> torch.Tensor:
    """Embed images with the (frozen) feature net.

    Args:
        images: uint8 (N,S,S,3) array or float (N,3,S,S) tensor in [0,1].
        feature_net: Defaults to :func:`default_feature_net` (seed 0).
        batch_size: Images per forward pass.

    Returns:
        float32 (N, D) CPU tensor.
    """
    net = feature_net or default_feature_net()
    # converted a batch at a time: the float copy of a whole set of 512 px images would be 3 MiB per image
    out = [net(to_tensor(images[i:i + batch_size])).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, getattr(net, "num_features", 0))


def fid_kid(real: ImagesLike, fake: ImagesLike, feature_net: Optional[nn.Module] = None,
            seed: int = 0, subsets: int = 50, batch_size: int = 64) -> dict[str, float]:
    """FID and KID between two image sets in the feature net's space (torchmetrics).

    Args:
        real: Real images (uint8 (N,S,S,3) or float (N,3,S,S)); at least 2.
        fake: Generated images, same formats; at least 2.
        feature_net: Defaults to :func:`default_feature_net`.
        seed: Seeds KID's random subsets (the global RNG is left untouched).
        subsets: KID subsets; ``subset_size = min(1000, len(real), len(fake))``.
        batch_size: Images per update.

    Returns:
        ``{"gen/fid", "gen/kid", "gen/kid_std"}``; NaN values when a set has fewer than 2 images.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net = feature_net or default_feature_net()
    n = min(len(real), len(fake))
    nan = float("nan")
    if n < 2:
        return {"gen/fid": nan, "gen/kid": nan, "gen/kid_std": nan}
    # Embed each set once and feed the features to both metrics through a pass-through module:
    # FID and KID would otherwise each run the encoder over every image.
    f_real = image_features(real, net, batch_size).double()
    f_fake = image_features(fake, net, batch_size).double()
    passthrough = _Features(f_real.shape[1])
    fid = FrechetInceptionDistance(feature=passthrough)
    with warnings.catch_warnings():  # "saves all features in a buffer": intended, N is small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=passthrough, subsets=subsets, subset_size=min(1000, n))
    for metric in (fid, kid):
        metric.update(f_real, real=True)
        metric.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"gen/fid": float(fid.compute()), "gen/kid": float(kid_mean), "gen/kid_std": float(kid_std)}


class _Features(nn.Module):
    """Identity "feature extractor" over precomputed (N, D) features (torchmetrics custom feature)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
