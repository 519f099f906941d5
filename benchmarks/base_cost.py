"""Generation cost of two diffusion bases, measured side by side (MSDM: compact vs larger base).

    python -m benchmarks.base_cost [--bases tiny outputs/bases/tiny_large --samples 32 --repeats 3]

Each repeat times ``InpaintingDiffusion.inpaint`` for every base in turn on the same inputs, so
both see the same machine load; the best repeat per base is kept. Prints one JSON line per base
(samples/s, UNet parameters) and one with ``cost_ratio`` = seconds per sample of each base over
those of the first.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.generation import bench_inputs, bench_model


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bases", nargs="+", default=["tiny", "outputs/bases/tiny_large"])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        models = [bench_model(base) for base in args.bases]
    except FileNotFoundError as err:
        raise SystemExit(f"{err} MSDM's larger base is made by `meddiffaug pretrain --width large "
                         "--vae-from tiny --out outputs/bases/tiny_large` (see sweeps/grids/msdm.yaml).") from None
    src, mask = bench_inputs(args.batch_size, args.size)
    prompts, neg = ["a polyp"] * args.batch_size, ["normal mucosa"] * args.batch_size
    n_batches = -(-args.samples // args.batch_size)
    kw = dict(guidance_scale=args.guidance_scale, steps=args.steps, progress=False)
    best = [float("inf")] * len(models)
    for model, _ in models:
        model.inpaint(src, mask, prompts, neg, **{**kw, "steps": 2})  # warm-up
    for _ in range(args.repeats):
        for i, (model, _) in enumerate(models):  # interleaved: every base sees the same load
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                model.inpaint(src, mask, prompts, neg, generator=g, **kw)
            best[i] = min(best[i], time.perf_counter() - t0)
    total = n_batches * args.batch_size
    rows = []
    for (model, name), seconds in zip(models, best):
        rows.append({"benchmark": "base_cost", "base": name, "samples": total, "steps": args.steps,
                     "threads": args.threads, "unet_params": sum(p.numel() for p in model.unet.parameters()),
                     "seconds": round(seconds, 3), "samples_per_s": round(total / seconds, 3)})
    rows.append({"benchmark": "base_cost", "reference": rows[0]["base"],
                 "cost_ratio": {r["base"]: round(s / best[0], 3) for r, s in zip(rows, best)}})
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
