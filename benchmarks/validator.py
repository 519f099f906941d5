"""Single-step latent validation vs full reverse diffusion vs pixel space (DiffAug: 12.5 vs 0.31 samples/s).

``python -m benchmarks.validator [--n 64] [--threshold 0.7] [--train-steps 150]``

On one set of generated samples (the tiny base inpainting lesions into procedural polyp images),
times the three gates side by side and measures how often their accept/reject decisions agree.
Prints ONE JSON line: single_step_sps, full_sps, pixel_sps, speedup_vs_full, agreement_vs_full,
agreement_vs_pixel, n, threshold (plus real pass rates and what base was used).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _diffusion(tmp: Path):
    """The shipped tiny base; if it is missing, an untrained tiny model (timings still valid)."""
    from lightning_modules.diffusion import InpaintingDiffusion
    try:
        return InpaintingDiffusion.from_base("tiny"), "tiny"
    except FileNotFoundError:
        from lightning_modules.components.tiny_base import build_tiny_components, save_components
        save_components(build_tiny_components(tmp / "tok"), tmp / "base")
        print("[benchmark] shipped tiny base missing: using an UNTRAINED tiny model (timings meaningful, "
              "agreement not)", file=sys.stderr)
        return InpaintingDiffusion.from_base(str(tmp / "base")), "untrained tiny (shipped base missing)"


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="generated samples")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--train-steps", type=int, default=150, help="validator / pixel segmenter steps")
    p.add_argument("--full-steps", type=int, default=50)
    args = p.parse_args(argv)
    try:
        from datamodules import create_datamodule
        from experiments.config import load_config
        from experiments.validate_stage import (make_gate, run_gate, to_tensor, train_latent_validator,
                                                train_pixel_segmenter)
        from lightning_modules.validator import mask_iou
    except ImportError as err:
        print(json.dumps({"error": f"benchmark needs the diffusion, datamodule and segmenter modules: {err}"}))
        return {}
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_validator_"))
    cfg = load_config(None, [f"validator.train_steps={args.train_steps}", f"validator.iou_threshold={args.threshold}",
                             "trainer.accelerator=auto", f"data.cache_dir={tmp / 'cache'}", "data.n_procedural=200"])
    dm = create_datamodule("procedural_polyp", **{k: v for k, v in cfg.data.items() if k != "name"})
    dm.setup()
    diffusion, base = _diffusion(tmp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    diffusion = diffusion.to(device).eval()
    prompt = getattr(diffusion, "lesion_prompt", "") or dm.prompt
    imgs, msks = to_tensor(dm.images), torch.from_numpy(dm.masks.astype("int64"))
    few, val = dm.split_indices["train_few"], dm.split_indices["val"]

    # generated samples: lesions inpainted under masks borrowed from other images
    pool = dm.split_indices["train"] + dm.split_indices["test"]
    src = torch.tensor([pool[i % len(pool)] for i in range(args.n)])
    intended = msks[src.roll(1)]
    gen = torch.Generator().manual_seed(0)
    outs = []
    for i in range(0, args.n, 16):
        with torch.no_grad():
            outs.append(diffusion.inpaint(imgs[src[i:i + 16]].to(device), intended[i:i + 16].to(device),
                                          [prompt] * len(src[i:i + 16]), guidance_scale=cfg.generation.guidance_scale,
                                          steps=cfg.generation.steps, generator=gen, progress=False).cpu())
    generated = torch.cat(outs)

    validator = train_latent_validator(cfg, diffusion, imgs[few].to(device), msks[few], prompt, dm.num_classes,
                                       tmp / "val").to(device)
    segmenter = train_pixel_segmenter(cfg, dm, tmp / "pix").to(device)
    kw = dict(cfg=cfg, prompt=prompt, num_classes=dm.num_classes, device=device, diffusion=diffusion,
              validator=validator, segmenter=segmenter, full_steps=args.full_steps)
    single, full = make_gate("single_step", **kw), make_gate("full", **kw)
    with torch.no_grad():
        latents = torch.cat([diffusion.encode_images(generated[i:i + 16].to(device)) for i in range(0, args.n, 16)])

    def pixel(z, m):  # decode + segment in pixel space
        with torch.no_grad():
            pred = segmenter.predict_masks(diffusion.decode_latents(z.to(device)))
        return mask_iou(pred.cpu(), m.long(), dm.num_classes), pred.cpu()

    run_gate(single, generated[:2], intended[:2]), pixel(latents[:2], intended[:2])  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    (iou_s, _), t_s = _timed(lambda: (run_gate(single, generated, intended), sync())[0])
    (iou_f, _), t_f = _timed(lambda: (run_gate(full, generated, intended), sync())[0])
    (iou_p, _), t_p = _timed(lambda: (run_gate(pixel, latents, intended), sync())[0])
    acc = {k: v >= args.threshold for k, v in (("s", iou_s), ("f", iou_f), ("p", iou_p))}
    real = {k: float((run_gate(g, imgs[val], msks[val])[0] >= args.threshold).float().mean())
            for k, g in (("single_step", single), ("full", full))}
    result = {
        "single_step_sps": round(args.n / t_s, 3), "full_sps": round(args.n / t_f, 3), "pixel_sps": round(args.n / t_p, 3),
        "speedup_vs_full": round(t_f / t_s, 2),
        "agreement_vs_full": round(float((acc["s"] == acc["f"]).float().mean()), 3),
        "agreement_vs_pixel": round(float((acc["s"] == acc["p"]).float().mean()), 3),
        "accept_rate_single_step": round(float(acc["s"].float().mean()), 3),
        "accept_rate_full": round(float(acc["f"].float().mean()), 3),
        "accept_rate_pixel": round(float(acc["p"].float().mean()), 3),
        "real_pass_rate_single_step": round(real["single_step"], 3), "real_pass_rate_full": round(real["full"], 3),
        "n": args.n, "threshold": args.threshold, "full_steps": args.full_steps, "base": base, "device": device.type,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
