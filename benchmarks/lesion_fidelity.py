"""Does a segmenter trained on real data find the generated lesions?

Trains the segment stage's segmenter on the *full* real training split (not the 16-shot subset:
the judge must be stronger than the models it judges), then reports the mean IoU between each
generated pair's intended mask and the judge's prediction, next to the same figure on the real
test pairs as the reference. Prints one JSON line.

    python -m benchmarks.lesion_fidelity --generate-dir artifacts/generate/<sig> [artifacts/generate/<sig2> ...]

Several folders (e.g. two diffusion bases, MSDM) are judged by the same judge, side by side; the
judge's training is not bit-reproducible on CPU, so only figures from one run compare.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from datamodules.errors import DataError
from datamodules.synthetic import SyntheticPairs
from experiments.config import load_config
from experiments.runner.pipeline import build_datamodule
from experiments.runner.builders import build_segmenter
from experiments.stages.segment import fit_segmenter
from lightning_modules.gating.latent_gate import mask_iou


def mean_iou(module, dataset, num_classes: int) -> float:
    """Mean per-sample IoU of ``module``'s predictions on the samples of ``dataset`` with a lesion."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    scores = []
    module.eval()
    with torch.no_grad():
        for batch in loader:
            pred = module.predict_masks(batch["image"])
            has_lesion = batch["mask"].flatten(1).amax(1) > 0  # empty truths would score 1.0 for free
            scores.append(mask_iou(pred, batch["mask"], num_classes)[has_lesion])
    return float(torch.cat(scores).nanmean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate-dir", required=True, nargs="+", help="finished generate-stage folder(s)")
    parser.add_argument("--config", default="experiments/configs/procedural_polyp_baseline.yaml")
    parser.add_argument("--steps", type=int, default=600, help="judge training steps")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["data.n_real=null", f"trainer.max_steps={args.steps}",
                                    "tracking.enabled=false"])
    # read every manifest first: a wrong folder fails before minutes of judge training, naming the file
    try:
        generated_sets = {folder: SyntheticPairs(Path(folder) / "manifest.jsonl", cfg.data.image_size)
                          for folder in args.generate_dir}
    except DataError as err:
        raise SystemExit(f"--generate-dir: {err}") from None
    datamodule = build_datamodule(cfg)
    start = time.time()
    # training logs go to stderr so stdout holds only the JSON line
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        metrics = fit_segmenter(cfg, datamodule, workdir)
        judge = build_segmenter(cfg, datamodule)
        best = sorted(Path(workdir, "checkpoints").glob("best-*.ckpt"))[-1]
        judge.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    result = {
        "judge_train_pairs": len(datamodule.split_indices["train_few"]),
        "judge_test_dice": round(metrics["test/dice"], 4),
        "real_test_mean_iou": round(mean_iou(judge, datamodule.dataset("test"), datamodule.num_classes), 4),
        "generated": [],  # one entry per folder, all judged by this judge
    }
    for folder, generated in generated_sets.items():
        result["generated"].append({
            "generate_dir": str(folder), "n_generated": len(generated),
            "generated_mean_iou": round(mean_iou(judge, generated, datamodule.num_classes), 4)})
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
