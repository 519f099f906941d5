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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from experiments.gate_training import (build_latent_bank, erase_lesions, load_validator, save_validator,  # noqa: F401 (API)
                                       train_latent_validator, train_pixel_segmenter, validator_settings)
from experiments.tracking import is_rank_zero as tracking_is_rank_zero
from datamodules import latent_store
from datamodules.io import atomic_write
from lightning_modules.gating.latent_gate import (encode_condition, encode_prompt, full_denoise_z0, mask_iou,
                                                      single_step_z0)

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
        from lightning_modules.gating.erosion import erode_mask
    except ImportError:  # sibling module not present yet: same semantics, per foreground class
        from scipy.ndimage import binary_erosion
        out = np.zeros_like(mask)
        for c in np.unique(mask[mask > 0]):
            out[binary_erosion(mask >= c, iterations=px)] = c
        return out
    result = erode_mask(mask, px)
    return (result.cpu().numpy() if torch.is_tensor(result) else np.asarray(result)).astype(np.uint8)


LATENT_BATCH = 64  # samples per ε̂ call in the latent gates (all share the prompt embedding)


def make_latent_gate(mode: str, cfg, num_classes: int, device: torch.device, diffusion, validator,
                     text: torch.Tensor, full_steps: int = FULL_STEPS) -> Callable:
    """``gate(cond, masks (B,H,W)) -> (iou (B,), pred (B,H,W))`` on precomputed latents.

    ``cond`` is a dict ``z0 (B,C,h,w), mask_lat (B,1,h,w), masked_lat (B,C,h,w)``; ``text`` (1,L,D)
    is the prompt embedding, encoded once. No VAE, no text encoder inside: ``single_step`` costs one
    ε̂ call + the validator, ``full`` costs ``full_steps`` ε̂ calls + the validator. Noise comes from
    one generator per gate seeded from the config, so both modes noise a sample identically.
    """
    if mode not in ("single_step", "full"):
        raise ValueError(f"validator.mode '{mode}' has no latent gate")
    gen = torch.Generator().manual_seed(int(cfg.generation.seed) + 1)
    t_eval, text = int(cfg.validator.t_eval), text.to(device)

    @torch.no_grad()
    def gate(cond: dict, masks: torch.Tensor):
        z0, m_lat, mi_lat = (cond[k].to(device) for k in ("z0", "mask_lat", "masked_lat"))
        if mode == "single_step":
            x, t_seg = single_step_z0(diffusion, z0, m_lat, mi_lat, text, t_eval, gen), t_eval
        else:
            x, t_seg = full_denoise_z0(diffusion, z0, m_lat, mi_lat, text, t_eval, full_steps, gen), 0
        pred = validator.predict_masks(x, t_seg, masks.shape[-2:], prompt=masks).cpu().long()
        return mask_iou(pred, masks.cpu().long(), num_classes), pred

    return gate


def run_latent_gate(gate: Callable, cond: dict, masks: torch.Tensor, batch_size: int = LATENT_BATCH):
    """Apply a latent gate in batches; returns (iou (N,), pred (N,H,W))."""
    ious, preds = [], []
    for i in range(0, len(masks), batch_size):
        iou, pred = gate({k: v[i:i + batch_size] for k, v in cond.items()}, masks[i:i + batch_size])
        ious.append(iou), preds.append(pred)
    if not ious:
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long)
    return torch.cat(ious), torch.cat(preds)


@torch.no_grad()
def encode_latents(diffusion, images: torch.Tensor, cond_masks: torch.Tensor, device: torch.device,
                   batch_size: int = 16) -> dict:
    """VAE latents + condition of (N,3,H,W) images under (N,H,W) condition masks, once per sample."""
    out = {"z0": [], "mask_lat": [], "masked_lat": []}
    for i in range(0, len(images), batch_size):
        parts = encode_condition(diffusion, images[i:i + batch_size].to(device), cond_masks[i:i + batch_size].to(device))
        for k, v in zip(out, parts):
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def gate_latents(mode: str, cfg, diffusion, validator, gen_dir: Path, rows: list, images: torch.Tensor,
                 masks: torch.Tensor, cond_masks: torch.Tensor, prompt: str, num_classes: int,
                 device: torch.device, full_steps: int = FULL_STEPS, batch_size: int = LATENT_BATCH):
    """What the validate stage runs for a latent gate (timed as a whole by it and by the benchmark).

    Latents come from the generate stage's ``latents/`` shards when every row has one (no VAE at
    all: DiffAug's latent-space validation); otherwise the VAE encodes each image once. The prompt is
    encoded once. Returns ``(iou (N,), pred (N,H,W), source)`` with ``source`` in {"generate", "vae"}.
    """
    if not rows:  # every sample was rejected early (or none generated)
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long), "none"
    cond = latent_store.load_latents(gen_dir, rows)
    source = "generate"
    if cond is None or cond["z0"].shape[0] != len(rows):
        cond, source = encode_latents(diffusion, images, cond_masks, device), "vae"
    with torch.no_grad():
        text = encode_prompt(diffusion, prompt)
    gate = make_latent_gate(mode, cfg, num_classes, device, diffusion, validator, text, full_steps)
    ious, preds = run_latent_gate(gate, cond, masks, batch_size)
    return ious, preds, source


def validator_cache_path(cfg, upstream: dict, settings: dict) -> Path:
    """Where the validate stage keeps a latent validator trained with ``settings``.

    ``artifacts/gate_models/<finetune signature>-<hash>.pt``: the validator learns from the real pairs
    and the fine-tuned model's ε̂ only, not from the generated samples, so every generate run of one
    fine-tune (a guidance-scale sweep) shares it. The hash covers the settings, the data config and
    the base model (what a run without fine-tune uses for ε̂).
    """
    import hashlib

    from omegaconf import OmegaConf

    source = Path(upstream["finetune"]).name if "finetune" in upstream else "base"
    key = {"settings": settings, "data": OmegaConf.to_container(cfg.data, resolve=True),
           "base_model": str(cfg.diffusion.base_model)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.artifacts_dir) / "gate_models" / f"{source}-{digest}.pt"


def _reuse_validator(cfg, upstream: dict, settings: dict, given=None, use_cache: bool = True):
    """``(validator, where from)``: the given one, generate's early-reject one, a cached one, or None.

    θ, erosion and the quality filter do not change the validator, so a sweep over them trains it once.
    """
    if given is not None:
        return given, "given"
    places = [(Path(upstream["generate"]) / "validator.pt", "from generate")]
    if use_cache:
        places.append((validator_cache_path(cfg, upstream, settings), "cached (same fine-tune + settings)"))
    for path, source in places:
        validator = load_validator(path, settings)
        if validator is not None:
            return validator, source
    return None, "none"


def make_gate(mode: str, cfg, prompt: str, num_classes: int, device: torch.device, diffusion=None,
              validator=None, segmenter=None, full_steps: int = FULL_STEPS) -> Callable:
    """Image-space gate ``gate(images (B,3,H,W) [0,1], masks (B,H,W)) -> (iou (B,), pred (B,H,W))``.

    ``pixel`` segments the images; the latent modes encode them (VAE) under their own masks and call
    :func:`make_latent_gate` (prompt encoded once, here). Used for real pairs and image-only inputs.
    """
    if mode == "pixel":
        @torch.no_grad()
        def pixel_gate(images: torch.Tensor, masks: torch.Tensor):
            pred = segmenter.predict_masks(images.to(device)).cpu().long()
            return mask_iou(pred, masks.cpu().long(), num_classes), pred
        return pixel_gate
    with torch.no_grad():
        latent = make_latent_gate(mode, cfg, num_classes, device, diffusion, validator,
                                  encode_prompt(diffusion, prompt), full_steps)

    def gate(images: torch.Tensor, masks: torch.Tensor):
        return latent(encode_latents(diffusion, images, masks, device, batch_size=len(images)), masks)

    return gate


def run_gate(gate: Callable, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 16):
    """Apply an image-space ``gate`` in batches; returns (iou (N,), pred (N,H,W))."""
    ious, preds = [], []
    for i in range(0, len(images), batch_size):
        iou, pred = gate(images[i:i + batch_size], masks[i:i + batch_size])
        ious.append(iou), preds.append(pred)
    if not ious:
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long)
    return torch.cat(ious), torch.cat(preds)


def real_gate_ious(gate: Callable, images: torch.Tensor, masks: torch.Tensor) -> dict:
    """The gate's IoUs on real validation pairs as they are and made wrong (for the sanity check).

    * ``real``: each image with its own mask (a good gate passes these);
    * ``misplaced``: each image claims its own mask moved by half the image size (the lesion is elsewhere);
    * ``missing``: each image has its lesion erased (:func:`erase_lesions`) but claims its mask.

    Returns:
        ``{"real", "misplaced", "missing"}`` -> IoU (N,) CPU tensors (empty without pairs).
    """
    if len(images) == 0:
        return {k: torch.zeros(0) for k in ("real", "misplaced", "missing")}
    h, w = masks.shape[-2:]
    return {"real": run_gate(gate, images, masks)[0],
            "misplaced": run_gate(gate, images, masks.roll((h // 2, w // 2), (-2, -1)))[0],
            "missing": run_gate(gate, erase_lesions(images, masks)[0], masks)[0]}


def calibrate_threshold(ious: dict, threshold: float, real_pass: Optional[float], floor: float = 0.0):
    """θ lowered to what ``real_pass`` of held-out real pairs reach; the sanity check uses other pairs.

    The even-indexed real validation pairs calibrate θ and the odd-indexed ones check the gate, so
    the reported real pass rate is not the calibration target read back. θ is never raised: a strong
    validator keeps the configured θ. Nor does it drop below ``floor``: a weak validator misses some
    real lesions entirely (IoU 0), and θ = 0 would pass pairs with no overlap at all.

    Args:
        ious: :func:`real_gate_ious` output, each (N,).
        threshold: the configured θ.
        real_pass: target share of real pairs to pass, or None (no calibration).
        floor: the lowest calibrated θ.

    Returns:
        ``(θ_effective, ious for the sanity check)``.
    """
    calib = ious["real"][0::2]
    calib = calib[~torch.isnan(calib)]
    if real_pass is None:
        return float(threshold), ious
    if len(calib) == 0 or len(ious["real"]) < 2:
        warnings.warn(f"[validate] validator.calibrate_real_pass needs at least 2 real validation pairs with a "
                      f"lesion; {len(ious['real'])} given, so θ stays {threshold}. Use a larger data.val_fraction.")
        return float(threshold), ious
    reached = float(torch.quantile(calib.float(), 1.0 - float(real_pass)))
    return min(float(threshold), max(float(floor), reached)), {k: v[1::2] for k, v in ious.items()}


def gate_sanity(ious: dict, threshold: float) -> dict:
    """``gen/real_pass_rate``, ``gen/real_mean_iou`` and the rejection rates of misplaced / missing real pairs."""
    def rate(x: torch.Tensor) -> float:
        return float(x.float().mean()) if len(x) else float("nan")

    return {"gen/real_pass_rate": rate(ious["real"] >= threshold), "gen/real_mean_iou": rate(ious["real"]),
            "gen/real_misplaced_reject_rate": rate(ious["misplaced"] < threshold),
            "gen/real_missing_reject_rate": rate(ious["missing"] < threshold)}


def load_generated(gen_dir: Path, size: Optional[int] = None):
    """The generate folder's finished samples, resized to ``size``, and its early-rejected rows.

    Returns:
        ``(rows, images (N,3,S,S) [0,1], masks (N,S,S) int64 labels, raw label arrays, cond_masks
        (N,S,S) int64, early_rows)``. ``cond_masks`` is the region generation inpainted (``new_mask``;
        the label for folders without one): the gate conditions on it as generation did, and outside
        it a generated image equals its source, so its masked-image latent is generation's own.
    """
    all_rows = [json.loads(line) for line in (gen_dir / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in all_rows if not r.get("early_rejected")]
    early = [r for r in all_rows if r.get("early_rejected")]
    if not rows:
        return rows, torch.zeros(0, 3, size or 1, size or 1), torch.zeros(0, size or 1, size or 1, dtype=torch.long), \
            [], torch.zeros(0, size or 1, size or 1, dtype=torch.long), early
    imgs = [np.asarray(Image.open(gen_dir / r["image"]).convert("RGB")) for r in rows]
    msks = [np.asarray(Image.open(gen_dir / r["mask"])) for r in rows]
    cond = [np.asarray(Image.open(gen_dir / r["new_mask"])) if r.get("new_mask") else m for r, m in zip(rows, msks)]
    images, masks = to_tensor(np.stack(imgs)), torch.from_numpy(np.stack(msks).astype(np.int64))
    cond_masks = torch.from_numpy(np.stack(cond).astype(np.int64))
    if size is not None and images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        cond_masks = F.interpolate(cond_masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    return rows, images, masks, msks, cond_masks, early


def save_accept_reject(path: Path, images: torch.Tensor, masks: torch.Tensor, preds: Optional[torch.Tensor],
                       ious: torch.Tensor, accepted: torch.Tensor, per_row: int = 6) -> None:
    """Two rows of panels, accepted then rejected: image, intended mask (green), prediction (yellow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("accepted", accepted.nonzero().flatten()[:per_row]), ("rejected", (~accepted).nonzero().flatten()[:per_row])]
    fig, axes = plt.subplots(2, per_row, figsize=(2 * per_row, 4.8), squeeze=False)
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
    fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.2)  # room for the title and both rows' captions
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accept_reject.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _load_diffusion(cfg, upstream: dict):
    """The fine-tuned model, or the base model for runs without a finetune stage (copy-paste)."""
    if "finetune" in upstream:
        from experiments.builders import load_finetuned
        return load_finetuned(cfg, upstream["finetune"]), "finetuned"
    from lightning_modules.diffusion import InpaintingDiffusion
    print(f"[validate] no finetune upstream: the {cfg.validator.mode} gate uses the base diffusion "
          f"'{cfg.diffusion.base_model}' for ε̂", flush=True)
    return InpaintingDiffusion.from_base(cfg.diffusion.base_model), "base (no finetune upstream)"


def run_validate(cfg, datamodule, workdir: Path, upstream: dict, logger=None, diffusion=None,
                 segmenter=None, feature_fn=None, full_steps: int = FULL_STEPS, validator=None) -> dict:
    """Gate, filter and erode the generated pairs of ``upstream["generate"]``.

    Args:
        cfg: resolved config (``cfg.validator`` drives everything).
        datamodule: set-up datamodule (real ``train_few`` trains the gate, ``val`` checks it).
        workdir: this stage's folder.
        upstream: ``{"generate": Path, "finetune": Path (diffusion runs only)}``.
        logger: Lightning logger for the gate's training, or None.
        diffusion: a ready diffusion object (tests, benchmarks); default loaded from upstream.
        segmenter: a ready pixel segmenter (``predict_masks``) for ``mode == "pixel"``; default trained.
        validator: a ready latent validator for the latent modes; default: the one the generate stage
            trained for early rejection (``validator.pt``, when its settings match), else trained here.
        feature_fn: feature extractor of the quality filter; default ``components.fidelity.image_features``.
        full_steps: DDIM steps of the ``full`` gate.

    Returns:
        ``gen/*`` metrics: accept_rate, n_accepted, n_samples, mean_iou, iou_threshold (θ applied), iou_pass_rate, quality_reject_rate,
        near_copy_rate, real_pass_rate, real_misplaced_reject_rate, real_missing_reject_rate, gate_flagged,
        real_quality_pass_rate, validate_sps, n_early_rejected.
        Samples the generate stage rejected early (``early_rejected`` rows) count as rejected.
    """
    from lightning_modules.gating.quality import FeatureQualityFilter

    workdir = Path(workdir)
    (workdir / "masks").mkdir(parents=True, exist_ok=True)
    v, mode = cfg.validator, str(cfg.validator.mode)
    datamodule.setup()
    idx = datamodule.split_indices
    real_img, real_msk = to_tensor(datamodule.images), torch.from_numpy(datamodule.masks.astype(np.int64))
    few, val = idx["train_few"], idx["val"]
    gen_dir = Path(upstream["generate"])
    rows, images, masks, raw_masks, cond_masks, early = load_generated(gen_dir, real_img.shape[-1])
    n, ncls, device = len(rows), int(datamodule.num_classes), _device(cfg)
    # the prompt generation conditioned on (recorded per row), else the config's / dataset's
    prompt = next((r["prompt"] for r in rows + early if r.get("prompt")), None) or cfg.diffusion.prompt or datamodule.prompt
    metrics: dict = {"gen/n_samples": float(n + len(early)), "gen/n_early_rejected": float(len(early))}

    ious, preds, gate_model = torch.full((n,), float("nan")), None, "none"
    theta = float(v.iou_threshold)  # lowered below when validator.calibrate_real_pass is set
    models_given = diffusion is not None or validator is not None  # tests/benchmarks: nothing to cache by key
    if mode != "none":
        if mode in ("single_step", "full"):
            if diffusion is None:
                diffusion, gate_model = _load_diffusion(cfg, upstream)
            else:
                gate_model = "given"
            diffusion = diffusion.to(device).eval() if hasattr(diffusion, "to") else diffusion
            settings = validator_settings(cfg, prompt, ncls)
            validator, val_src = _reuse_validator(cfg, upstream, settings, validator, use_cache=not models_given)
            if validator is None:
                val_src = "trained here"
                validator = train_latent_validator(cfg, diffusion, real_img[few].to(device), real_msk[few],
                                                   prompt, ncls, workdir, logger)
                if tracking_is_rank_zero() and not models_given:
                    save_validator(validator_cache_path(cfg, upstream, settings), validator, settings)
            validator = validator.to(device) if hasattr(validator, "to") else validator
            start = time.time()  # the whole gate: latents (loaded or encoded) + prompt + ε̂ + validator
            ious, preds, lat_src = gate_latents(mode, cfg, diffusion, validator, gen_dir, rows, images, masks,
                                                cond_masks, prompt, ncls, device, full_steps)
            metrics["gen/validate_sps"] = n / max(time.time() - start, 1e-9)
            gate_model = f"{mode}@t{int(v.t_eval)} on {gate_model} diffusion; validator {val_src}; latents from {lat_src}"
        elif segmenter is None:
            segmenter, gate_model = train_pixel_segmenter(cfg, datamodule, workdir, logger).to(device), "pixel segmenter"
        else:
            gate_model = "pixel segmenter (given)"
        gate = make_gate(mode, cfg, prompt, ncls, device, diffusion, validator, segmenter, full_steps)
        if mode == "pixel":
            start = time.time()
            ious, preds = run_gate(gate, images, masks)
            metrics["gen/validate_sps"] = n / max(time.time() - start, 1e-9)
        # the real pairs' IoUs depend on the gate, not on θ: a θ sweep computes them once
        sanity_cache = None
        if mode != "pixel" and not models_given:
            sanity_cache = validator_cache_path(cfg, upstream, settings).with_suffix(f".{mode}{full_steps}.real_ious.pt")
        real_ious = torch.load(sanity_cache, weights_only=True) if sanity_cache and sanity_cache.is_file() else None
        if real_ious is None:
            real_ious = real_gate_ious(gate, real_img[val], real_msk[val])
            if sanity_cache is not None and tracking_is_rank_zero():
                atomic_write(sanity_cache, lambda f: torch.save(real_ious, f))
        theta, check_ious = calibrate_threshold(real_ious, theta, v.calibrate_real_pass, v.calibrate_min_threshold)
        metrics.update(gate_sanity(check_ious, theta))
        real_pass = metrics["gen/real_pass_rate"]
        metrics["gen/mean_iou"] = float(ious.mean()) if n else 0.0
    else:
        real_pass = 1.0  # no gate: nothing real can fail it
    if mode != "none":  # no gate, no θ
        metrics["gen/iou_threshold"] = theta
    iou_ok = torch.ones(n, dtype=torch.bool) if mode == "none" else ious >= theta
    metrics["gen/real_pass_rate"] = real_pass
    # a gate must pass real pairs AND reject them made wrong (a gate at θ = 0 passes the first check)
    weak_rejects = [k.split("_")[1] for k in ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")
                    if metrics.get(k, 1.0) < 0.5]
    metrics["gen/gate_flagged"] = float(real_pass < 0.8 or bool(weak_rejects))
    if weak_rejects:
        warnings.warn(f"[validate] the {mode} gate at IoU >= {theta:.3g} rejects fewer than half of the real pairs "
                      f"made wrong ({', '.join(weak_rejects)} lesions): it passes wrong pairs (gen/gate_flagged=1).")
    if real_pass < 0.8:
        warnings.warn(f"[validate] the {mode} gate passes only {real_pass:.0%} of REAL validation pairs at "
                      f"IoU >= {theta:.3g}: it judges its own weakness, not the samples (gen/gate_flagged=1)."
                      + ("" if v.calibrate_real_pass is not None else
                         " validator.calibrate_real_pass=0.8 lowers θ to what real pairs reach."))

    score = torch.full((n,), float("nan"))
    outlier = near = torch.zeros(n, dtype=torch.bool)
    if v.quality_filter and n:
        qf = FeatureQualityFilter(feature_fn, quality_quantile=v.quality_quantile,
                                  near_copy_quantile=v.near_copy_quantile).fit(real_img[few])
        pos = {sid: i for i, sid in enumerate(datamodule.ids)}
        src_idx = [pos.get(r.get("source_id"), -1) for r in rows]
        has_src = torch.tensor([i >= 0 for i in src_idx], dtype=torch.bool)
        rep = qf.assess(images, real_img[[max(i, 0) for i in src_idx]], masks, has_src)
        score, outlier, near = rep.score, rep.outlier, rep.near_copy
        metrics["gen/real_quality_pass_rate"] = float(qf.assess(real_img[val]).accepted.float().mean()) if len(val) else float("nan")
    accepted = iou_ok & ~outlier & ~near

    acc_rows, decisions = [], []
    for i, row in enumerate(rows):
        reasons = ([] if iou_ok[i] else [f"iou<{theta:.4g}"]) + (["outlier"] if outlier[i] else []) \
            + (["near_copy"] if near[i] else [])
        iou = None if torch.isnan(ious[i]) else round(float(ious[i]), 4)
        q = None if torch.isnan(score[i]) else round(float(score[i]), 4)
        decisions.append({"id": row["id"], "accepted": bool(accepted[i]), "iou": iou, "quality_score": q,
                          "reasons": reasons, "gate": gate_model})
        if accepted[i]:
            mask_path = workdir / "masks" / f"{row['id']}.png"
            _write_png(mask_path, erode(raw_masks[i].astype(np.uint8), int(v.erode_px)))
            acc_rows.append({**row, "image": str((gen_dir / row["image"]).resolve()), "mask": str(mask_path.relative_to(workdir)),  # workdir is renamed when done
                             "iou": iou, "quality_score": q})
    for row in early:  # stopped mid-sampling by the generate stage's gate: never finished, rejected
        decisions.append({"id": row["id"], "accepted": False, "iou": row.get("early_reject_iou"), "quality_score": None,
                          "reasons": [f"early_reject@t{row.get('early_reject_t')}"], "gate": "early reject (generate)"})
    _write_jsonl(workdir / "decisions.jsonl", decisions)
    _write_jsonl(workdir / "accepted.jsonl", acc_rows)
    if n:
        save_accept_reject(workdir / "accept_reject.png", images, masks, preds, ious, accepted)
    total = n + len(early)
    metrics.update({
        "gen/n_accepted": float(accepted.sum()), "gen/accept_rate": float(accepted.sum()) / total if total else 0.0,
        "gen/early_reject_rate": len(early) / total if total else 0.0,
        "gen/iou_pass_rate": float(iou_ok.sum()) / total if total else 0.0,
        "gen/quality_reject_rate": float(outlier.float().mean()) if n else 0.0,
        "gen/near_copy_rate": float(near.float().mean()) if n else 0.0,
    })
    return metrics
