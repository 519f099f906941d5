"""Validate stage: IoU gate (latent or pixel validator), feature-space quality filter, mask erosion.

Reads the generate stage's ``manifest.jsonl``; writes ``accepted.jsonl``, ``decisions.jsonl``,
eroded masks under ``masks/`` and ``accept_reject.png``; returns ``gen/*`` metrics including the gate
sanity check on real validation pairs (``gen/real_pass_rate``, ``gen/gate_flagged``).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from lightning_modules.validator import (LatentValidator, diffusion_condition, estimate_z0, add_noise, full_denoise,
                                         mask_iou, single_step_estimate)

FULL_STEPS = 50  # DDIM steps of the "full" gate (DiffAug's baseline)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list) -> None:
    _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def _write_png(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def _device(cfg) -> torch.device:
    want_gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto")
    return torch.device("cuda" if want_gpu and torch.cuda.is_available() else "cpu")


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """Erode a class-index mask (H,W) by ``px`` with ``components.erosion.erode_mask`` (lazy import)."""
    if px <= 0:
        return mask
    try:
        from lightning_modules.components.erosion import erode_mask
    except ImportError:  # sibling module not present yet: same semantics, per foreground class
        from scipy.ndimage import binary_erosion
        out = np.zeros_like(mask)
        for c in np.unique(mask[mask > 0]):
            out[binary_erosion(mask >= c, iterations=px)] = c
        return out
    result = erode_mask(mask, px)
    return (result.cpu().numpy() if torch.is_tensor(result) else np.asarray(result)).astype(np.uint8)


def build_latent_bank(diffusion, images: torch.Tensor, masks: torch.Tensor, prompt: str, t_focus: list,
                      per_image: int = 9, batch_size: int = 16, seed: int = 0) -> dict:
    """Validator training items from real pairs: clean latents and single-step ẑ0 estimates.

    The inpainting condition makes ε̂ worse inside the conditioning mask, and every real image holds a
    lesion; a validator trained only on (image, own mask) learns "blurry region = lesion" and passes
    samples whose lesion is missing. So the estimates cycle through three conditions:

    * the pair itself, conditioned on its own mask (what a good sample looks like);
    * conditioned on another pair's mask (a clean lesion outside the mask: a *misplaced* lesion);
    * "erased": the lesion region (dilated) replaced by another image's pixels at the same place,
      target mixed accordingly, conditioned on the original mask (a *missing* lesion).

    Timesteps alternate between the gate's ``t_focus`` and draws in ``[1, 1.5·max(t_focus)]``.

    Args:
        images: (N,3,H,W) in [0,1] on the diffusion's device.
        masks: (N,H,W) int64 class indices.

    Returns:
        dict of CPU tensors ``x (M,C,h,w)``, ``t (M,)``, ``z0 (M,C,h,w)``, ``mask (M,H,W)``.
    """
    gen = torch.Generator().manual_seed(seed)
    T = int(diffusion.num_train_timesteps)
    t_hi = max(2, min(T - 1, int(1.5 * max(t_focus))))
    out = {"x": [], "t": [], "z0": [], "mask": []}

    def add(x, t, z0, m):
        out["x"].append(x.cpu()), out["t"].append(t.cpu()), out["z0"].append(z0.cpu()), out["mask"].append(m.cpu())

    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            img, m = images[i:i + batch_size], masks[i:i + batch_size].to(images.device)
            roll = (lambda x: x.roll(1, 0)) if len(m) > 1 else (lambda x: x.flip(-1).flip(-2))
            pad = max(1, img.shape[-1] // 16)
            region = F.max_pool2d((m > 0).float()[:, None], 2 * pad + 1, 1, pad)[:, 0].bool()
            img_mix = torch.where(region[:, None], roll(img), img)
            m_mix = torch.where(region, roll(m), m)
            z0, *cond_true = diffusion_condition(diffusion, img, m, prompt)
            cond_other = diffusion_condition(diffusion, img, roll(m), prompt)[1:]
            z0_mix, *cond_mix = diffusion_condition(diffusion, img_mix, m, prompt)
            variants = [(z0, cond_true, m), (z0, cond_other, m), (z0_mix, cond_mix, m_mix)]
            ac = diffusion.alphas_cumprod.to(z0.device)
            zeros = torch.zeros(len(img), dtype=torch.long)
            add(z0, zeros, z0, m), add(z0_mix, zeros, z0_mix, m_mix)
            for j in range(per_image):
                t = t_focus[j % len(t_focus)] if j % 2 == 0 else int(torch.randint(1, t_hi, (), generator=gen))
                tt = torch.full((len(img),), int(t), dtype=torch.long, device=z0.device)
                zc, cond, target = variants[j % 3]
                eps = torch.randn(zc.shape, generator=gen).to(zc.device, zc.dtype)
                z_t = add_noise(zc, eps, ac, tt)
                add(estimate_z0(z_t, diffusion.predict_eps(z_t, tt, *cond), ac, tt), tt, zc, target)
    return {k: torch.cat(v) for k, v in out.items()}


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, bank: dict):
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank["x"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.bank.items()}


def _fit(module: L.LightningModule, loader: DataLoader, cfg, steps: int, ckpt_dir: Path, logger=None) -> None:
    """Train ``steps`` steps with checkpoint/resume from ``ckpt_dir/last.ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=max(1, steps // 4))
    # one device: these gate models are small, and DDP would only add start-up cost
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=cfg.trainer.accelerator, devices=1,
                        precision=cfg.trainer.precision, logger=logger if logger is not None else False,
                        callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)


def train_latent_validator(cfg, diffusion, images: torch.Tensor, masks: torch.Tensor, prompt: str,
                           num_classes: int, workdir: Path, logger=None) -> LatentValidator:
    """Train the :class:`LatentValidator` on real pairs (clean, ẑ0 estimates, noised) and return it (eval)."""
    v = cfg.validator
    t_focus = [int(v.t_eval)] + ([int(v.early_reject_t)] if v.early_reject_t is not None else [])
    bank = build_latent_bank(diffusion, images, masks, prompt, t_focus, seed=int(cfg.generation.seed))
    L.seed_everything(int(cfg.generation.seed), workers=True, verbose=False)
    model = LatentValidator(in_channels=bank["x"].shape[1], num_classes=num_classes, lr=v.lr,
                            train_steps=v.train_steps, num_train_timesteps=int(diffusion.num_train_timesteps),
                            alphas_cumprod=diffusion.alphas_cumprod.detach().cpu(), noisy_t_max=max(t_focus) * 3 // 2 + 1)
    sampler = RandomSampler(_DictDataset(bank), replacement=True, num_samples=v.train_steps * 16,
                            generator=torch.Generator().manual_seed(int(cfg.generation.seed)))
    loader = DataLoader(_DictDataset(bank), batch_size=16, sampler=sampler, num_workers=0)
    _fit(model, loader, cfg, v.train_steps, workdir / "checkpoints" / "validator", logger)
    return model.eval()


def train_pixel_segmenter(cfg, datamodule, workdir: Path, logger=None):
    """A quick ``SegmenterModule`` on the real ``train_few`` pairs (the pixel-space gate)."""
    from lightning_modules.segmenter import SegmenterModule

    s, steps = cfg.segmenter, int(cfg.validator.train_steps)
    L.seed_everything(int(cfg.generation.seed), workers=True, verbose=False)
    model = SegmenterModule(arch=s.arch, encoder=s.encoder, encoder_weights=s.encoder_weights,
                            num_classes=datamodule.num_classes, lr=s.lr, weight_decay=s.weight_decay,
                            min_lr_ratio=s.min_lr_ratio, small_lesion_area=cfg.data.small_lesion_area, total_steps=steps)
    ds = datamodule.dataset("train_few", train_transforms=True)
    loader = DataLoader(ds, batch_size=min(int(cfg.data.batch_size), len(ds)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(int(cfg.generation.seed)))
    _fit(model, loader, cfg, steps, workdir / "checkpoints" / "pixel_segmenter", logger)
    return model.eval()


def make_gate(mode: str, cfg, prompt: str, num_classes: int, device: torch.device, diffusion=None,
              validator=None, segmenter=None, full_steps: int = FULL_STEPS) -> Callable:
    """``gate(images (B,3,H,W) [0,1], masks (B,H,W)) -> (iou (B,), pred (B,H,W))`` for one mode.

    Noise is drawn from one generator per gate, seeded from the config (deterministic runs).
    """
    gen = torch.Generator().manual_seed(int(cfg.generation.seed) + 1)
    t_eval = int(cfg.validator.t_eval)

    @torch.no_grad()
    def gate(images: torch.Tensor, masks: torch.Tensor):
        images, masks = images.to(device), masks.to(device).long()
        size = masks.shape[-2:]
        if mode == "single_step":
            pred = validator.predict_masks(single_step_estimate(diffusion, images, masks, prompt, t_eval, gen), t_eval, size)
        elif mode == "full":
            pred = validator.predict_masks(full_denoise(diffusion, images, masks, prompt, t_eval, full_steps, gen), 0, size)
        elif mode == "pixel":
            pred = segmenter.predict_masks(images)
        else:
            raise ValueError(f"validator.mode '{mode}' has no gate")
        pred = pred.to(device).long()
        return mask_iou(pred, masks, num_classes).cpu(), pred.cpu()

    return gate


def run_gate(gate: Callable, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 16):
    """Apply ``gate`` in batches; returns (iou (N,), pred (N,H,W))."""
    ious, preds = [], []
    for i in range(0, len(images), batch_size):
        iou, pred = gate(images[i:i + batch_size], masks[i:i + batch_size])
        ious.append(iou), preds.append(pred)
    return torch.cat(ious), torch.cat(preds)


def load_generated(gen_dir: Path, size: Optional[int] = None):
    """Manifest rows and the generated images (N,3,S,S) [0,1] / masks (N,S,S) int64, resized to ``size``."""
    rows = [json.loads(line) for line in (gen_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    imgs = [np.asarray(Image.open(gen_dir / r["image"]).convert("RGB")) for r in rows]
    msks = [np.asarray(Image.open(gen_dir / r["mask"])) for r in rows]
    images, masks = to_tensor(np.stack(imgs)), torch.from_numpy(np.stack(msks).astype(np.int64))
    if size is not None and images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return rows, images, masks, msks


def save_accept_reject(path: Path, images: torch.Tensor, masks: torch.Tensor, preds: Optional[torch.Tensor],
                       ious: torch.Tensor, accepted: torch.Tensor, per_row: int = 6) -> None:
    """Two rows of panels, accepted then rejected: image, intended mask (green), prediction (yellow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("accepted", accepted.nonzero().flatten()[:per_row]), ("rejected", (~accepted).nonzero().flatten()[:per_row])]
    fig, axes = plt.subplots(2, per_row, figsize=(2 * per_row, 4.4), squeeze=False)
    for row, (name, idx) in enumerate(groups):
        for col in range(per_row):
            ax = axes[row, col]
            ax.axis("off")
            if col >= len(idx):
                continue
            i = int(idx[col])
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            if masks[i].any():
                ax.contour(masks[i].numpy() > 0, levels=[0.5], colors="lime", linewidths=1)
            if preds is not None and preds[i].any():
                ax.contour(preds[i].numpy() > 0, levels=[0.5], colors="yellow", linewidths=1)
            iou = "–" if torch.isnan(ious[i]) else f"{float(ious[i]):.2f}"
            ax.set_title(f"{name} IoU {iou}", fontsize=8, color="green" if name == "accepted" else "red")
    fig.suptitle("green: intended mask, yellow: validator prediction", fontsize=9)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accept_reject.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _load_diffusion(cfg, upstream: dict):
    """The fine-tuned model, or the base model for runs without a finetune stage (copy-paste)."""
    if "finetune" in upstream:
        from experiments.finetune_stage import load_finetuned
        return load_finetuned(cfg, upstream["finetune"]), "finetuned"
    from lightning_modules.diffusion import InpaintingDiffusion
    print(f"[validate] no finetune upstream: the {cfg.validator.mode} gate uses the base diffusion "
          f"'{cfg.diffusion.base_model}' for ε̂", flush=True)
    return InpaintingDiffusion.from_base(cfg.diffusion.base_model), "base (no finetune upstream)"


def run_validate(cfg, datamodule, workdir: Path, upstream: dict, logger=None, diffusion=None,
                 segmenter=None, feature_fn=None, full_steps: int = FULL_STEPS) -> dict:
    """Gate, filter and erode the generated pairs of ``upstream["generate"]``.

    Args:
        cfg: resolved config (``cfg.validator`` drives everything).
        datamodule: set-up datamodule (real ``train_few`` trains the gate, ``val`` checks it).
        workdir: this stage's folder.
        upstream: ``{"generate": Path, "finetune": Path (diffusion runs only)}``.
        logger: Lightning logger for the gate's training, or None.
        diffusion: a ready diffusion object (tests, benchmarks); default loaded from upstream.
        segmenter: a ready pixel segmenter (``predict_masks``) for ``mode == "pixel"``; default trained.
        feature_fn: feature extractor of the quality filter; default ``components.fidelity.image_features``.
        full_steps: DDIM steps of the ``full`` gate.

    Returns:
        ``gen/*`` metrics: accept_rate, n_accepted, n_samples, mean_iou, iou_pass_rate, quality_reject_rate,
        near_copy_rate, real_pass_rate, gate_flagged, real_quality_pass_rate, validate_sps.
    """
    from lightning_modules.components.quality import FeatureQualityFilter

    workdir = Path(workdir)
    (workdir / "masks").mkdir(parents=True, exist_ok=True)
    v, mode = cfg.validator, str(cfg.validator.mode)
    datamodule.setup()
    idx = datamodule.split_indices
    real_img, real_msk = to_tensor(datamodule.images), torch.from_numpy(datamodule.masks.astype(np.int64))
    few, val = idx["train_few"], idx["val"]
    size = real_img.shape[-1]
    gen_dir = Path(upstream["generate"])
    rows, images, masks, raw_masks = load_generated(gen_dir, size)
    n, ncls, device = len(rows), int(datamodule.num_classes), _device(cfg)
    prompt = cfg.diffusion.prompt or datamodule.prompt  # as the generate stage conditions
    metrics: dict = {"gen/n_samples": float(n)}

    ious, preds, gate_model = torch.full((n,), float("nan")), None, "none"
    start = time.time()
    if mode != "none":
        validator = None
        if mode in ("single_step", "full"):
            if diffusion is None:
                diffusion, gate_model = _load_diffusion(cfg, upstream)
            else:
                gate_model = "given"
            diffusion = diffusion.to(device).eval() if hasattr(diffusion, "to") else diffusion
            validator = train_latent_validator(cfg, diffusion, real_img[few].to(device), real_msk[few],
                                               prompt, ncls, workdir, logger).to(device)
            gate_model = f"{mode}@t{int(v.t_eval)} on {gate_model} diffusion"
        elif segmenter is None:
            segmenter, gate_model = train_pixel_segmenter(cfg, datamodule, workdir, logger).to(device), "pixel segmenter"
        gate = make_gate(mode, cfg, prompt, ncls, device, diffusion, validator, segmenter, full_steps)
        start = time.time()
        ious, preds = run_gate(gate, images, masks)
        metrics["gen/validate_sps"] = n / max(time.time() - start, 1e-9)
        real_ious, _ = run_gate(gate, real_img[val], real_msk[val])
        real_pass = float((real_ious >= v.iou_threshold).float().mean()) if len(val) else float("nan")
        metrics["gen/mean_iou"] = float(ious.mean()) if n else 0.0
        metrics["gen/real_mean_iou"] = float(real_ious.mean()) if len(val) else float("nan")
    else:
        real_pass = 1.0  # no gate: nothing real can fail it
    iou_ok = torch.ones(n, dtype=torch.bool) if mode == "none" else ious >= v.iou_threshold
    metrics["gen/real_pass_rate"] = real_pass
    metrics["gen/gate_flagged"] = float(real_pass < 0.8)
    if real_pass < 0.8:
        warnings.warn(f"[validate] the {mode} gate passes only {real_pass:.0%} of REAL validation pairs at "
                      f"IoU >= {v.iou_threshold}: it judges its own weakness, not the samples (gen/gate_flagged=1).")

    score = torch.full((n,), float("nan"))
    outlier = near = torch.zeros(n, dtype=torch.bool)
    if v.quality_filter:
        qf = FeatureQualityFilter(feature_fn, quality_quantile=v.quality_quantile,
                                  near_copy_quantile=v.near_copy_quantile).fit(real_img[few])
        pos = {sid: i for i, sid in enumerate(datamodule.ids)}
        src_idx = [pos.get(r.get("source_id"), -1) for r in rows]
        has_src = torch.tensor([i >= 0 for i in src_idx], dtype=torch.bool)
        sources = real_img[[max(i, 0) for i in src_idx]] if n else None
        rep = qf.assess(images, sources, masks, has_src)
        score, outlier, near = rep.score, rep.outlier, rep.near_copy
        metrics["gen/real_quality_pass_rate"] = float(qf.assess(real_img[val]).accepted.float().mean()) if len(val) else float("nan")
    accepted = iou_ok & ~outlier & ~near

    acc_rows, decisions = [], []
    for i, row in enumerate(rows):
        reasons = ([] if iou_ok[i] else [f"iou<{v.iou_threshold}"]) + (["outlier"] if outlier[i] else []) \
            + (["near_copy"] if near[i] else [])
        iou = None if torch.isnan(ious[i]) else round(float(ious[i]), 4)
        q = None if torch.isnan(score[i]) else round(float(score[i]), 4)
        decisions.append({"id": row["id"], "accepted": bool(accepted[i]), "iou": iou, "quality_score": q,
                          "reasons": reasons, "gate": gate_model})
        if accepted[i]:
            mask_path = workdir / "masks" / f"{row['id']}.png"
            _write_png(mask_path, erode(raw_masks[i].astype(np.uint8), int(v.erode_px)))
            acc_rows.append({**row, "image": str((gen_dir / row["image"]).resolve()), "mask": str(mask_path.resolve()),
                             "iou": iou, "quality_score": q})
    _write_jsonl(workdir / "decisions.jsonl", decisions)
    _write_jsonl(workdir / "accepted.jsonl", acc_rows)
    if n:
        save_accept_reject(workdir / "accept_reject.png", images, masks, preds, ious, accepted)
    metrics.update({
        "gen/n_accepted": float(accepted.sum()), "gen/accept_rate": float(accepted.float().mean()) if n else 0.0,
        "gen/iou_pass_rate": float(iou_ok.float().mean()) if n else 0.0,
        "gen/quality_reject_rate": float(outlier.float().mean()) if n else 0.0,
        "gen/near_copy_rate": float(near.float().mean()) if n else 0.0,
    })
    return metrics
