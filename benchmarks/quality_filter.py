"""Held-out real images the feature-space quality filter rejects: random resnet18 vs VAE features.

A filter that tells real images from wrong ones rejects about ``1 - quality_quantile`` of held-out
real images (and every noise image). Prints one JSON line per config, seed and feature kind.

    python -m benchmarks.quality_filter experiments/configs/procedural_polyp_diffaug.yaml \
        experiments/configs/procedural_fundus_baseline.yaml --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from datamodules import create_datamodule
from datamodules.synthetic import to_tensor
from experiments.config import load_config
from lightning_modules.diffusion import InpaintingDiffusion
from lightning_modules.gating.fidelity import image_features
from lightning_modules.gating.quality import FeatureQualityFilter
from lightning_modules.gating.vae_features import vae_feature_fn


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality_filter", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", help="experiment YAMLs whose data to use")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quantile", type=float, default=0.95, help="validator.quality_quantile")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = InpaintingDiffusion.from_base("tiny").eval()
    features = {"random_resnet18": image_features, "vae": vae_feature_fn(base)}
    for config in args.configs:
        for seed in args.seeds:
            cfg = load_config(config, [f"data.split_seed={seed}", "tracking.enabled=false"])
            kwargs = OmegaConf.to_container(cfg.data, resolve=True)
            datamodule = create_datamodule(kwargs.pop("name"), **kwargs)
            datamodule.setup()
            images, split = to_tensor(datamodule.images), datamodule.split_indices
            fit = images[split["train_few"]]
            held_out = images[[i for i in list(split["val"]) + list(split["test"]) if i not in set(split["train_few"])]]
            noise = torch.rand(16, 3, *images.shape[-2:], generator=torch.Generator().manual_seed(0))
            for name, feature_fn in features.items():
                quality = FeatureQualityFilter(feature_fn, quality_quantile=args.quantile).fit(fit)
                print(json.dumps({
                    "config": config, "seed": seed, "features": name, "n_fit": len(fit), "n_held_out": len(held_out),
                    "nominal_reject_rate": round(1 - args.quantile, 3),
                    "real_reject_rate": round(float(quality.assess(held_out).outlier.float().mean()), 3),
                    "noise_reject_rate": round(float(quality.assess(noise).outlier.float().mean()), 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
