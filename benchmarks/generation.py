"""Throughput of guided inpainting and its overhead over the bare UNet passes it needs.

    python -m benchmarks.generation [--samples 32 --steps 25 --batch-size 16 --threads 1]

Prints one JSON line: samples/s of ``InpaintingDiffusion.inpaint`` (CFG, guiding mask) and
``overhead_ratio`` = inpaint time / time of the same number of batched UNet calls alone
(2 × batch per call with CFG), both measured in this run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def bench_model(base: str):
    from lightning_modules.tiny_base import TINY_DIR, build_tiny_components
    from lightning_modules.diffusion import InpaintingDiffusion

    if base != "tiny" or (TINY_DIR / "unet").is_dir():
        return InpaintingDiffusion.from_base(base, finetune="none").eval(), base
    # Timing does not depend on the weights: fall back to a random tiny base of the same shape.
    comps = build_tiny_components(tempfile.mkdtemp(prefix="tok"))
    return InpaintingDiffusion(**comps, finetune="none").eval(), "tiny (random init; shipped base missing)"


def bench_inputs(batch: int, size: int):
    """Fixed random sources (B,3,S,S) and a centred square inpainting mask (B,1,S,S)."""
    g = torch.Generator().manual_seed(0)
    src = torch.rand(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    q = size // 4
    mask[:, :, q:3 * q, q:3 * q] = 1
    return src, mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="tiny")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, base = bench_model(args.base)
    g = torch.Generator().manual_seed(1)
    src, mask = bench_inputs(args.batch_size, args.size)
    prompts, neg = ["a polyp"] * args.batch_size, ["normal mucosa"] * args.batch_size
    n_batches = -(-args.samples // args.batch_size)
    kw = dict(guidance_scale=args.guidance_scale, steps=args.steps, scheduler=args.scheduler, progress=False)
    model.inpaint(src, mask, prompts, neg, **{**kw, "steps": 2})  # warm-up

    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.inpaint(src, mask, prompts, neg, generator=g, **kw)
    t_inpaint = time.perf_counter() - t0

    # The bare UNet work of the same run: steps × batched calls (doubled batch under CFG).
    cfg = args.guidance_scale != 1.0
    b = args.batch_size * (2 if cfg else 1)
    with torch.no_grad():
        z = model.encode_images(src[:1]).repeat(b, 1, 1, 1)
        m = model.mask_to_latent(mask[:1], z.shape[-2:]).repeat(b, 1, 1, 1)
        emb = model.encode_prompts(["a polyp"]).repeat(b, 1, 1)
        t0 = time.perf_counter()
        for _ in range(n_batches * args.steps):
            model.predict_eps(z, 500, m, z, emb)
        t_unet = time.perf_counter() - t0
    total = n_batches * args.batch_size
    print(json.dumps({
        "benchmark": "generation", "base": base, "samples": total, "steps": args.steps, "batch_size": args.batch_size,
        "guidance_scale": args.guidance_scale, "scheduler": args.scheduler, "threads": args.threads,
        "inpaint_seconds": round(t_inpaint, 3), "samples_per_s": round(total / t_inpaint, 3),
        "unet_only_seconds": round(t_unet, 3), "unet_calls": n_batches * args.steps,
        "overhead_ratio": round(t_inpaint / t_unet, 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
