"""Is center B a shift? A real-only segmenter's Dice on center A (in-domain) vs center B, per modality.

``OMP_NUM_THREADS=1 python -m benchmarks.external_shift [--kinds polyp skin fundus ultrasound]
[--seeds 0 1 2] [--test-pool 200] [--out outputs/external_shift] [--pictures docs/images] [overrides ...]``

For each kind and seed, trains the real-only baseline (the frozen block's real-only arm:
``experiments/configs/procedural_polyp_baseline.yaml``, 16 labelled pairs of which 4 validate,
300 steps) with ``data.external_tests=[{name: procedural_<kind>, center: b}]``: the same selected
checkpoint is tested on the fixed center-A test pool (``test/dice``) and on the center-B pool of the
same size (``test/procedural_<kind>_center_b/dice``). Seed s sets the segmenter seed, the split and
the seed's own training content. Prints one JSON line per run, then one per kind with the mean Dice
of each center and the paired gap A − B with its 95 % t-interval over seeds. Stages are cached under
``--out`` (by signature), so a rerun prints the same numbers without training. With ``--pictures DIR``
it only writes ``DIR/external_center_<kind>.png`` per kind (8 pairs of each center at 64 px: center
A images and mask outlines over center B's) and trains nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

KINDS = ("polyp", "skin", "fundus", "ultrasound")
BASE = "experiments/configs/procedural_polyp_baseline.yaml"


def run_one(kind: str, seed: int, test_pool: int, out: str, overrides: list) -> dict:
    """Train one real-only segmenter (or reuse it) and return its center-A and center-B metrics."""
    from experiments.config import load_config
    from experiments.runner.pipeline import run_stages

    label = f"procedural_{kind}_center_b"
    cfg = load_config(BASE, [
        f"data.name=procedural_{kind}", "data.n_real=16", "data.n_val=4", f"data.test_pool={test_pool}",
        f"data.external_tests=[{{name: procedural_{kind}, center: b}}]",
        f"seed={seed}", f"data.split_seed={seed}", f"data.procedural_seed={seed}", f"augment.seed={seed}",
        "tracking.enabled=false", f"output_dir={out}", f"artifacts_dir={out}/artifacts", *overrides])
    with contextlib.redirect_stdout(sys.stderr):  # stage and training logs; stdout holds the JSON lines
        metrics = run_stages(cfg, targets=["segment"]).metrics
    return {"kind": kind, "seed": seed, "dice_a": metrics["test/dice"], "dice_b": metrics[f"test/{label}/dice"],
            "iou_a": metrics["test/iou"], "iou_b": metrics[f"test/{label}/iou"],
            "fnr_small_a": metrics.get("test/fnr_small"), "fnr_small_b": metrics.get(f"test/{label}/fnr_small"),
            "val_dice": metrics["val/dice"], "collapsed": bool(metrics["seg/collapsed"])}


def summarise(kind: str, rows: list) -> dict:
    """Mean Dice per center and the paired gap A − B over seeds, with its 95 % t-interval."""
    a, b = np.array([r["dice_a"] for r in rows]), np.array([r["dice_b"] for r in rows])
    gap = a - b
    half = stats.t.ppf(0.975, len(gap) - 1) * gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    return {"kind": kind, "n_seeds": len(rows), "dice_a": round(float(a.mean()), 4), "dice_b": round(float(b.mean()), 4),
            "gap": round(float(gap.mean()), 4), "gap_ci95": [round(float(gap.mean() - half), 4),
                                                            round(float(gap.mean() + half), 4)],
            "n_collapsed": sum(r["collapsed"] for r in rows)}


def save_pictures(kinds, folder: str, n: int = 8, size: int = 64) -> list:
    """Write one PNG per kind: center A's test pool (images over outlines) above center B's.

    Stored with a 256-colour palette: a quarter of the bytes of full colour, for pictures kept in the repository.
    """
    from PIL import Image

    from datamodules.inspect_procedural import center_pool, sample_grid
    from datamodules.io import atomic_write

    paths = []
    for kind in kinds:
        rows = [sample_grid(*(a[:n] for a in center_pool(kind, c, n, size)), n) for c in ("a", "b")]
        gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
        picture = Image.fromarray(np.concatenate([rows[0], gap, rows[1]], 0)).quantize(256)
        path = Path(folder) / f"external_center_{kind}.png"
        paths.append(str(atomic_write(path, lambda f, p=picture: p.save(f, format="png", optimize=True), fsync=False)))
    return paths


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.external_shift", description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-pool", type=int, default=200, help="pairs of each center's test pool")
    parser.add_argument("--out", default="outputs/external_shift", help="where stages are cached")
    parser.add_argument("--pictures", default=None, help="only write the center A vs B pictures to this folder")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = parser.parse_args(argv)
    if args.pictures:
        return save_pictures(args.kinds, args.pictures)
    summaries = []
    for kind in args.kinds:
        rows = []
        for seed in args.seeds:
            rows.append(run_one(kind, seed, args.test_pool, args.out, list(args.overrides)))
            print(json.dumps(rows[-1]), flush=True)
        summaries.append(summarise(kind, rows))
        print(json.dumps(summaries[-1]), flush=True)
    return summaries


if __name__ == "__main__":
    main()
