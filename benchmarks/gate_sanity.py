"""How well does the latent gate judge REAL pairs? Prompted vs plain (DiffAug) validator, side by side.

``python -m benchmarks.gate_sanity [--config experiments/configs/procedural_polyp_diffaug.yaml] [--seed 0]``

Fine-tunes the diffusion model of the config (or reuses the cached stage), then trains the latent
validator twice on the same 16 real pairs — ``validator.prompted=true`` and ``false`` — and runs
each single-step gate on the real validation pairs as they are, with the mask moved away
(misplaced) and with the lesion erased (missing). Prints one JSON line per validator with the mean
IoU on real pairs (and on their clean latents, validation vs training pairs) and, for several θ,
the pass rate of real pairs and the rejection rates of the misplaced and missing ones (a useful
gate passes the first and rejects the other two).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

THETAS = (0.5, 0.6, 0.7, 0.8)


def _clean_latent_iou(diffusion, validator, images: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    """Mean IoU of the validator's masks on the clean VAE latents (t = 0) of real pairs (N,3,H,W), (N,H,W)."""
    from experiments.stages.validate.gate import encode_latents
    from lightning_modules.gating.latent_gate import mask_iou

    latents = encode_latents(diffusion, images, masks, torch.device("cpu"))
    pred = validator.predict_masks(latents["z0"], 0, masks.shape[-2:], prompt=masks)
    return float(mask_iou(pred, masks, num_classes).nanmean())


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gate_sanity", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/procedural_polyp_diffaug.yaml")
    parser.add_argument("--seed", type=int, default=0, help="split, real subset and generation seed")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args(argv)
    from experiments.config import load_config
    from experiments.runner.builders import load_finetuned
    from experiments.runner.gate_training import train_latent_validator
    from experiments.runner.pipeline import build_datamodule, run_stages
    from datamodules.synthetic import to_tensor
    from experiments.stages.validate.gate import make_gate
    from lightning_modules.gating.sanity import gate_sanity, real_gate_ious

    seeds = [f"seed={args.seed}", f"data.split_seed={args.seed}", f"generation.seed={args.seed}"]
    cfg = load_config(args.config, seeds + ["tracking.enabled=false"] + list(args.overrides))
    results = []
    with contextlib.redirect_stdout(sys.stderr):  # stage and training logs; stdout holds the JSON lines
        datamodule = build_datamodule(cfg)
        finetune_dir = run_stages(cfg, targets=["finetune"], datamodule=datamodule).stage_dirs["finetune"]
        diffusion = load_finetuned(cfg, finetune_dir)
        idx = datamodule.split_indices
        images, masks = to_tensor(datamodule.images), torch.from_numpy(datamodule.masks.astype(np.int64))
        for prompted in (True, False):
            run_cfg = load_config(args.config, seeds + ["tracking.enabled=false", f"validator.prompted={prompted}"]
                                  + list(args.overrides))
            with tempfile.TemporaryDirectory() as workdir:
                validator = train_latent_validator(run_cfg, diffusion, images[idx["train_few"]], masks[idx["train_few"]],
                                                   datamodule.prompt, datamodule.num_classes, Path(workdir))
            gate = make_gate("single_step", run_cfg, datamodule.prompt, datamodule.num_classes, torch.device("cpu"),
                             diffusion, validator)
            ious = real_gate_ious(gate, images[idx["val"]], masks[idx["val"]])
            by_theta = {str(t): {k.split("/")[1]: round(v, 3) for k, v in gate_sanity(ious, t).items()
                                 if k != "gen/real_mean_iou"} for t in THETAS}
            # the validator on clean latents (no noise, no ε̂): validation vs its own training pairs
            # separates what 16 pairs teach from what the single-step estimate loses
            clean = {split: round(float(_clean_latent_iou(diffusion, validator, images[idx[split]], masks[idx[split]],
                                                          datamodule.num_classes)), 3) for split in ("val", "train_few")}
            results.append({"validator": "prompted" if prompted else "plain (DiffAug)", "seed": args.seed,
                            "n_real_train": len(idx["train_few"]), "n_val": len(idx["val"]),
                            "real_mean_iou": round(float(ious["real"].mean()), 3),
                            "clean_latent_iou_val": clean["val"], "clean_latent_iou_train": clean["train_few"],
                            "by_theta": by_theta})
    for row in results:
        print(json.dumps(row))
    return results


if __name__ == "__main__":
    main()
