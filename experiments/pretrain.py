"""``meddiffaug pretrain``: pretrain the shipped tiny inpainting base from scratch.

Phase 1 trains the VAE (MSE + small L1 + tiny KL) on a procedural pool of every modality;
phase 2 precomputes latents once and trains the 9-channel UNet and the text encoder on
inpainting of random shapes (rectangles, blobs, brush strokes) under a generic caption of the
image's modality, with condition dropout (CFG), as public inpainting models are trained.
Pretraining never reads a lesion mask: the pool is images only, so the fine-tune on a run's
``n_real`` pairs is the only place the diffusion arm meets lesion labels (the real-only and
copy-paste arms get the same labels and no others).
Writes a diffusers-format folder (safetensors) and MODEL_CARD.md atomically.

    python -m experiments.pretrain --threads 1 --vae-steps 1000 --unet-steps 6000
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.tiny_base import TINY_DIR, build_tiny_components, save_components


def _log(path: Path, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def _lr(step: int, total: int, base: float, warmup: int = 200, time_frac: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 10 % over whichever runs out first: steps or time.

    On a shared machine the step rate varies, so a time budget must still end at a low LR.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    frac = max((step - warmup) / max(1, total - warmup), time_frac)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def modality_caption(kind) -> str:
    """A generic caption of a procedural kind's modality, naming no lesion ("colonoscopy image")."""
    return kind.prompt.split(" showing")[0]


def load_pool(pool_size: int, size: int, seed: int):
    """Render ``pool_size`` images of every procedural kind; their lesion masks are dropped here.

    Returns:
        images uint8 (N,S,S,3), kind index (N,), one generic caption per kind.
    """
    from datamodules.procedural import PROCEDURAL_KINDS, render_procedural

    ims, kinds, captions = [], [], []
    for k, (name, spec) in enumerate(PROCEDURAL_KINDS.items()):
        im, _lesion_masks_unused, _ = render_procedural(name, pool_size, size, seed + 1000 + k)  # seeds disjoint from datasets' 0
        ims.append(im), kinds.append(np.full(len(im), k)), captions.append(modality_caption(spec))
    return np.concatenate(ims), np.concatenate(kinds), captions


def train_vae(vae, images: np.ndarray, steps: int, batch: int, log: Path, state: dict, budget_s: float = float("inf"),
              crop: int = 0) -> float:
    """Phase 1 (stops after ``budget_s`` seconds). Returns held-out PSNR (dB) of full-size reconstructions.

    ``crop`` > 0 trains on random crops of that side: the VAE is convolutional, so crops teach
    the same reconstruction at a fraction of the cost per sample (SD's VAE was trained on crops too).
    """
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    held_out = torch.arange(len(x_all)) % 37 == 0  # strided: every kind is represented
    held, train = x_all[held_out], x_all[~held_out]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    vae.train()
    t0 = time.time()
    for step in range(state.get("vae_step", 0), steps):
        used = (time.time() - t0) / budget_s
        if used >= 1:
            _log(log, f"vae time budget reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 1e-3, warmup=100, time_frac=used)
        x = train[torch.randint(len(train), (batch,))]
        if 0 < crop < x.shape[-1]:
            oy, ox = (torch.randint(0, x.shape[-1] - crop + 1, (2,)) // 4 * 4).tolist()  # latent-grid aligned
            x = x[..., oy:oy + crop, ox:ox + crop]
        x = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x, x.flip(-1))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log(log, f"vae step {step}/{steps} loss {loss.item():.5f}")
        state.update(vae_step=step + 1)
    vae.eval()
    with torch.no_grad():
        rec = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (held + 1) / 2).item()
    state["vae_opt"] = opt.state_dict()
    return 10 * math.log10(1 / mse)


@torch.no_grad()
def vae_psnr_by_kind(vae, size: int, seed: int, n: int = 32) -> dict:
    """Reconstruction PSNR (dB, posterior mean) per procedural kind on images outside the pool."""
    from datamodules.procedural import PROCEDURAL_KINDS, render_procedural

    out = {}
    for k, name in enumerate(PROCEDURAL_KINDS):
        im, _, _ = render_procedural(name, n, size, seed + 5000 + k)
        x = torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out[name] = round(10 * math.log10(1 / F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()), 2)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meddiffaug pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(TINY_DIR), help="diffusers folder to write (default: the shipped tiny base)")
    p.add_argument("--work", default="outputs/pretrain", help="scratch folder: log, resume checkpoint")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget of the whole run (still saves)")
    p.add_argument("--vae-share", type=float, default=0.35, help="share of --max-minutes the VAE may use")
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--vae-crop", type=int, default=32, help="train the VAE on random crops of this side (0 = full)")
    p.add_argument("--pool-size", type=int, default=600, help="images per procedural kind")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", default="default", choices=["default", "large"],
                   help="component widths: the shipped base, or a UNet with twice the channels, "
                        "about 4x the parameters (MSDM's larger model)")
    p.add_argument("--vae-from", default=None,
                   help="diffusers folder (or 'tiny') whose VAE is reused frozen: skips the VAE phase "
                        "(the VAE is trained on images only, never on masks)")
    p.add_argument("--resume", action="store_true", help="continue from WORK/state.pt")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    log, state_path, t0 = work / "pretrain.log", work / "state.pt", time.time()
    command = "meddiffaug pretrain " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    _log(log, f"start: {command}")
    images, kinds, captions = load_pool(args.pool_size, args.image_size, args.seed)
    _log(log, f"pool: {len(images)} images of {len(captions)} kinds, no lesion masks; captions {captions}")
    comps = build_tiny_components(work / "tokenizer", width=args.width, image_size=args.image_size, seed=args.seed)
    state = torch.load(state_path, weights_only=False) if args.resume and state_path.is_file() else {}
    psnr_by_kind = vae_phase(args, comps, images, state, state_path, log, t0)
    ema, step, final_loss = unet_phase(args, comps, images, kinds, captions, state, state_path, log, t0)
    comps["unet"] = ema
    card = {
        "command": command, "data": f"procedural pool, {args.pool_size} images x {len(captions)} kinds at {args.image_size}px (seeds {args.seed}+1000+k)",
        "vae_steps": state.get("vae_step"), "vae_batch_size": args.vae_batch_size, "vae_crop": args.vae_crop, "vae_psnr_db": None if state["vae_psnr"] is None else round(state["vae_psnr"], 2),
        "vae_source": state.get("vae_source"), "vae_widths": list(comps["vae"].config.block_out_channels),
        "unet_widths": list(ema.config.block_out_channels), "out": str(out), "vae_psnr_by_kind": psnr_by_kind, "vae_scaling_factor": round(state["vae_scale"], 5),
        "unet_steps": step, "batch_size": args.batch_size, "final_unet_loss": round(final_loss, 5),
        "unet_params": sum(p.numel() for p in ema.parameters()),
        "wall_minutes": round((time.time() - t0) / 60, 1), "threads": args.threads,
        "captions": captions, "lesion_masks_seen": 0,
    }
    write_base(comps, out, card)
    _log(log, f"done: {json.dumps(card)}")
    return 0


def vae_phase(args: argparse.Namespace, comps: dict, images: np.ndarray, state: dict, state_path: Path, log: Path,
              t0: float) -> dict:
    """Phase 1: reuse a frozen VAE (``--vae-from``) or train one; returns its PSNR per kind on fresh images."""
    if args.vae_from and not state.get("vae_done"):
        from diffusers import AutoencoderKL

        source = TINY_DIR if args.vae_from == "tiny" else Path(args.vae_from)
        if not (source / "vae").is_dir():
            raise SystemExit(f"--vae-from {args.vae_from}: '{source / 'vae'}' is not a diffusers VAE folder")
        comps["vae"] = AutoencoderKL.from_pretrained(source / "vae")
        state.update(vae=comps["vae"].state_dict(), vae_done=True, vae_psnr=None, vae_step=0,
                     vae_scale=float(comps["vae"].config.scaling_factor), vae_seconds=0.0, vae_source=args.vae_from)
        _log(log, f"vae reused from {source} (frozen; VAE phase skipped)")
    if "vae" in state:
        comps["vae"].load_state_dict(state["vae"])
    if not state.get("vae_done"):
        budget = 60 * args.max_minutes * args.vae_share if args.max_minutes else float("inf")
        psnr = train_vae(comps["vae"], images, args.vae_steps, args.vae_batch_size, log, state, budget, args.vae_crop)
        with torch.no_grad():  # unit-variance latents for the diffusion schedule (SD's scaling_factor idea)
            x = torch.from_numpy(images[:512]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
            std = comps["vae"].encode(x).latent_dist.mean.std().item()
        comps["vae"].register_to_config(scaling_factor=1.0 / std)
        state.update(vae=comps["vae"].state_dict(), vae_done=True, vae_psnr=psnr, vae_scale=1.0 / std,
                     vae_seconds=time.time() - t0)
        torch.save(state, state_path)
        _log(log, f"vae done: PSNR {psnr:.2f} dB, scaling_factor {1 / std:.4f}")
    comps["vae"].register_to_config(scaling_factor=state["vae_scale"])
    comps["vae"].eval().requires_grad_(False)
    psnr_by_kind = vae_psnr_by_kind(comps["vae"], args.image_size, args.seed)
    _log(log, f"vae PSNR by kind (fresh images): {psnr_by_kind}")
    return psnr_by_kind


def unet_phase(args: argparse.Namespace, comps: dict, images: np.ndarray, kinds: np.ndarray, captions: list,
               state: dict, state_path: Path, log: Path, t0: float) -> tuple:
    """Phase 2: the UNet and text encoder on inpainting of random shapes; returns ``(ema_unet, steps, loss)``."""
    from lightning_modules.diffusion import InpaintingDiffusion
    from lightning_modules.diffusion_bank import RANDOM, build_inpainting_bank, variant_weights

    model = InpaintingDiffusion(**comps, finetune="full", train_text_encoder=True, cond_dropout=0.1, base_model="scratch")
    model.set_prompts(captions)  # kind k: caption 1+k
    t1 = time.time()
    no_lesion = np.zeros(images.shape[:3], np.uint8)  # the bank builder gets no lesion region at all
    bank = build_inpainting_bank(model, images, no_lesion, 0, 0, n_background=0, n_random=3,
                                 seed=args.seed, random_prompt_idx=1 + kinds)
    if not bool((bank["kind"] == RANDOM).all()):
        raise RuntimeError("pretraining must see random inpainting regions only, never a lesion mask")
    weights = variant_weights(bank, background_fraction=0.0, random_fraction=1.0)
    _log(log, f"latent bank: {len(weights)} variants in {time.time() - t1:.0f}s")
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    ema = copy.deepcopy(model.unet).requires_grad_(False)
    if "unet" in state:
        model.unet.load_state_dict(state["unet"]), model.text_encoder.load_state_dict(state["text_encoder"])
        ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
    gen = torch.Generator().manual_seed(args.seed)
    step, losses, t_unet = state.get("unet_step", 0), [], time.time()
    model.train()
    # The UNet phase gets what is left of the budget, minus ~1 min for writing the folder.
    unet_budget = 60 * args.max_minutes - (time.time() - t0) - 60 if args.max_minutes else float("inf")
    while step < args.unet_steps:
        used = (time.time() - t_unet) / max(unet_budget, 1.0)
        if used >= 1:
            _log(log, f"time budget of {args.max_minutes} min reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.unet_steps, 5e-4, time_frac=used)
        i = torch.multinomial(weights, args.batch_size, replacement=True, generator=gen)
        batch = dict(z0=bank["z0"][bank["img"][i]], mask_lat=bank["mask_lat"][i], masked_lat=bank["masked_lat"][i],
                     prompt_idx=bank["prompt_idx"][i])
        loss = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            _log(log, f"unet step {step}/{args.unet_steps} loss {np.mean(losses[-100:]):.4f} "
                      f"({(time.time() - t_unet) / max(1, step - state.get('unet_step0', 0)):.2f}s/step)")
        if step % 500 == 0:
            state.update(unet=model.unet.state_dict(), text_encoder=model.text_encoder.state_dict(), ema=ema.state_dict(),
                         opt=opt.state_dict(), unet_step=step)
            torch.save(state, state_path)
    return ema, step, float(np.mean(losses[-200:])) if losses else float("nan")


def write_base(comps: dict, out: Path, card: dict) -> None:
    """Write the diffusers folder (EMA UNet weights), its card and metrics, replacing ``out`` atomically."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(comps, tmp)
    card["weights_mb"] = round(sum(f.stat().st_size for f in tmp.rglob("*.safetensors")) / 2 ** 20, 2)
    (tmp / "MODEL_CARD.md").write_text(_card(card))
    (tmp / "pretrain_metrics.json").write_text(json.dumps(card, indent=2))
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _card(c: dict) -> str:
    captions = ", ".join(f'"{t}"' for t in c["captions"])
    vae_widths = tuple(c.get("vae_widths") or (32, 64, 64))
    if c.get("vae_source"):
        vae_training = f"reused frozen from `{c['vae_source']}` (not trained here)"
    else:
        vae_training = (f"{c['vae_steps']} steps at batch {c['vae_batch_size']} (random {c['vae_crop']} px crops);\n"
                        f"  held-out reconstruction PSNR **{c['vae_psnr_db']} dB**")
    loads = "\"tiny\"" if c.get("out") in (None, str(TINY_DIR)) else f"\"{c['out']}\""
    return f"""# Tiny inpainting diffusion base (meddiffaug)

Latent-diffusion inpainting model in diffusers format, pretrained from scratch on CPU by
`meddiffaug pretrain`; loads offline with `InpaintingDiffusion.from_base({loads})`.

* Command: `{c['command']}` ({c['threads']} thread(s))
* Data: {c['data']}; no real images.
* VAE: AutoencoderKL {vae_widths}, 64 px -> 16x16x4 latents; {vae_training};
  PSNR per kind on fresh images {c['vae_psnr_by_kind']}
  (ultrasound speckle is noise the 16x16x4 latent cannot keep); scaling_factor {c['vae_scaling_factor']}.
* UNet: UNet2DConditionModel {tuple(c.get("unet_widths") or (32, 64, 64))}, in_channels 9 = [noisy latents 4, mask 1, masked-image latents 4],
  {c['unet_params']:,} parameters; {c['unet_steps']} steps at batch {c['batch_size']} (EMA weights);
  final ε-MSE loss **{c['final_unet_loss']}**. Text encoder: CLIPTextModel (hidden 64, 2 layers), trained jointly.
* Training regions: random shapes (rectangles, blobs, brush strokes; 3 per image) under a generic
  caption of the image's modality ({captions}); 10 % condition dropout (for CFG).
* **Never saw a lesion mask** or a lesion prompt: pretraining renders the images and drops their
  masks (`experiments/pretrain.py` `load_pool`), and refuses to train on any region that is not a
  random shape. The fine-tune on a run's `n_real` pairs is the first time the model meets lesion
  labels, as with a public foundation model.
* Wall time: {c['wall_minutes']} min; weights {c['weights_mb']} MB (safetensors).

Intended use: a small base to fine-tune (LoRA or full) on a few real pairs in tests, demos and
CPU experiments. Not a medical device; images are synthetic stand-ins.
"""


if __name__ == "__main__":
    raise SystemExit(main())
