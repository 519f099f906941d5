"""Generate stage: synthetic image–mask pairs by diffusion inpainting or the copy-paste control.

Sample ``i`` depends only on ``(cfg.generation.seed, i)`` and the training data: its source
image, mask (every mask-generator choice) and label are planned identically for
``augment.method = diffusion`` and ``copy_paste``, so the two methods differ only in the pixels
inside the new mask. Outputs (under ``workdir``): ``images/<id>.png``, ``masks/<id>.png`` (label =
existing lesions ∪ new lesion), ``new_masks/<id>.png`` (new lesion only), ``manifest.jsonl``
(one line per sample: every seed and parameter), ``grid.png``, and for diffusion
``latents/<first id>.pt`` (final clean latents + inpainting condition of each finished sample, so
the validate stage gates in latent space without the VAE). Each batch is written
PNGs-first, manifest-last, all atomically, so a killed run resumes after the last finished
batch: ids already in the manifest are skipped.

Early rejection (DiffAug): with ``validator.mode = single_step`` and ``validator.early_reject_t``
set, the latent validator is trained here on the real ``train_few`` pairs (saved as
``validator.pt``; the validate stage reuses it) and judges each sample's ẑ0 at the first sampler
step with ``t <= early_reject_t``. A failing sample is stopped there: no further UNet calls, no
image; its manifest row has ``early_rejected: true``, ``early_reject_iou`` and ``image: null``.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omegaconf import DictConfig

from datamodules import latent_store
from datamodules.io import (ImageFiles, append_manifest, atomic_write, read_image, read_manifest, read_mask,
                            write_manifest, write_pair, write_png)
from experiments.cache.signatures import subtree
from lightning_modules.synthesis import copy_paste as copy_paste_lib
from lightning_modules.gating.fidelity import fid_kid
from lightning_modules.synthesis.copy_paste import lesion_components
from lightning_modules.synthesis.planner import Planner, copy_paste_batch, sample_id

# Bump when this stage's code changes what it produces for the same config (see experiments.runner.pipeline).
VERSION = 0
METHODS = ("diffusion", "copy_paste")


def inputs(cfg: DictConfig) -> dict[str, Any]:
    """The config values this stage's result depends on (its part of the signature)."""
    out = {"data": subtree(cfg, "data"), "generation": subtree(cfg, "generation"), "method": cfg.augment.method}
    if cfg.augment.method == "copy_paste" and copy_paste_lib.COPY_PASTE_VERSION > 1:
        out["copy_paste_version"] = copy_paste_lib.COPY_PASTE_VERSION  # only copy-paste outputs are recomputed
    if cfg.augment.method == "diffusion":
        out["diffusion_prompt"] = cfg.diffusion.prompt
        if early_reject_enabled(cfg):  # trains the latent validator here and stops samples at θ
            out["early_reject"] = {k: cfg.validator[k] for k in
                                   ("early_reject_t", "iou_threshold", "t_eval", "train_steps", "lr")}
    return out


def load_model(cfg, upstream: dict):
    """The fine-tuned ``InpaintingDiffusion`` of the finetune stage (tests monkeypatch this)."""
    if "finetune" not in upstream:
        raise ValueError("augment.method=diffusion needs the finetune stage's output "
                         "(upstream['finetune'] is missing): add 'finetune' to cfg.stages")
    from experiments.runner.builders import load_finetuned  # lazy: heavy, and written concurrently

    return load_finetuned(cfg, Path(upstream["finetune"]))


def early_reject_enabled(cfg) -> bool:
    """Early rejection runs for diffusion generation under the single-step gate with ``early_reject_t`` set."""
    v = cfg.validator
    return str(cfg.augment.method) == "diffusion" and v.early_reject_t is not None and str(v.mode) == "single_step"


def load_validator(cfg, model, datamodule, workdir: Path, prompt: str):
    """The latent validator for early rejection: ``workdir/validator.pt`` if trained with these
    settings, else trained on the real ``train_few`` pairs (resumable) and saved (tests monkeypatch this)."""
    from experiments.runner.gate_training import load_validator as load, save_validator, train_latent_validator
    from experiments.runner.gate_training import normal_pool, validator_settings

    ncls = _num_classes(datamodule)
    settings = validator_settings(cfg, prompt, ncls)
    validator = load(workdir / "validator.pt", settings)
    if validator is None:
        few = list(datamodule.split_indices["train_few"])
        # the datamodule's uint8 arrays: the bank converts and moves them to the model a batch at a time
        validator = train_latent_validator(cfg, model, datamodule.images[few], datamodule.masks[few], prompt, ncls,
                                           workdir / "validator_train", pool=normal_pool(datamodule))
        save_validator(workdir / "validator.pt", validator, settings)
    return validator.to(_model_device(model)).eval()


def _num_classes(datamodule) -> int:
    return int(getattr(datamodule, "num_classes", None) or len(datamodule.classes))


def _base_record(cfg, p: dict, method: str) -> dict[str, Any]:
    src = p["source"]
    return {"id": p["id"], "method": method, "seed": int(cfg.generation.seed), "sample_index": p["index"],
            "sample_seed": p["sample_seed"], "source_id": src.id, "source_index": src.index,
            "source_kind": src.kind, "source_attempt": p["source_attempt"],
            "mask_source": str(cfg.generation.mask_source), "scale_range": list(cfg.generation.scale_range),
            "elastic": float(cfg.generation.elastic), "mask_params": p["mask_params"],
            "image_size": int(src.image.shape[0]), "label_classes": sorted(int(c) for c in np.unique(p["label"]))}


def _prompts(cfg, model, datamodule) -> tuple[str, str]:
    """(lesion prompt, negative prompt): the ones the model was fine-tuned under when it carries
    them (``InpaintingDiffusion.lesion_prompt`` / ``.background_prompt``), else the config's or
    the datamodule's. A mismatch with the training prompts would waste the fine-tune."""
    def text(obj, name):
        value = getattr(obj, name, None)
        return value if isinstance(value, str) and value else None

    prompt = text(model, "lesion_prompt") or cfg.diffusion.prompt or datamodule.prompt
    negative = text(model, "background_prompt") or text(datamodule, "background_prompt") or ""
    return prompt, negative


def _model_device(model) -> torch.device:
    """Where the model's weights live (its ``device`` attribute, else its first parameter)."""
    dev = getattr(model, "device", None)
    if dev is None and hasattr(model, "parameters"):
        dev = next(iter(model.parameters()), torch.empty(0)).device
    return torch.device(dev or "cpu")


def _diffusion_batch(cfg, model, plans: list, prompt: str, negative: str, validator=None,
                     num_classes: int = 2) -> tuple[list, list, dict]:
    """Inpaint one batch. Returns (images uint8 (S,S,3) or None if stopped early, manifest extras,
    info with ``latents``/``mask_latents``/``masked_latents`` (B,...) when the model returns them)."""
    g = cfg.generation
    src = torch.stack([torch.from_numpy(p["source"].image).permute(2, 0, 1).float() / 255.0 for p in plans])
    msk = torch.stack([torch.from_numpy((p["new_mask"] > 0).astype(np.float32))[None] for p in plans])
    dev = _model_device(model)
    # One generator per batch, seeded by its first sample: batches are fixed by index, so a
    # resumed run regenerates an unfinished batch exactly.
    batch_seed = plans[0]["sample_seed"]
    gen = torch.Generator().manual_seed(batch_seed)
    kw, callback = {}, None
    if validator is not None:  # the gate targets the full label (existing ∪ new lesion), as in validate
        from lightning_modules.gating.latent_gate import make_early_reject_callback

        labels = torch.stack([torch.from_numpy(p["label"].astype(np.int64)) for p in plans])
        callback = make_early_reject_callback(validator, labels, float(cfg.validator.iou_threshold),
                                              int(cfg.validator.early_reject_t), model.alphas_cumprod, num_classes)
        kw["step_callback"] = callback
    kw["return_info"] = True  # latents and early-stop flags come back with the images
    with torch.no_grad():
        out = model.inpaint(src.to(dev), msk.to(dev), [prompt] * len(plans), [negative] * len(plans),
                            guidance_scale=float(g.guidance_scale), steps=int(g.steps),
                            scheduler=str(g.scheduler), guiding_mask=bool(g.guiding_mask),
                            guide_dilate_px=int(g.guide_dilate_px), generator=gen, **kw)
    out, info = out
    imgs = (out.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    stopped = info.get("stopped", callback.stopped if callback is not None and callback.stopped is not None
                       else torch.zeros(len(plans), dtype=torch.bool))
    extra = [{"guidance_scale": float(g.guidance_scale), "steps": int(g.steps), "scheduler": str(g.scheduler),
              "guiding_mask": bool(g.guiding_mask), "guide_dilate_px": int(g.guide_dilate_px),
              "prompt": prompt, "negative_prompt": negative, "batch_seed": batch_seed,
              "batch_position": k} for k in range(len(plans))]
    if callback is not None:
        for k, ex in enumerate(extra):
            fired = callback.ious is not None
            ex.update({"early_rejected": bool(stopped[k]), "early_reject_t": callback.t,
                       "early_reject_iou": round(float(callback.ious[k]), 4) if fired else None})
    return [None if stopped[k] else imgs[k] for k in range(len(plans))], extra, info


def _write_batch(workdir: Path, cfg, method: str, plans: list, outs: list, extra: list, info: dict) -> list:
    """Write one batch's PNGs (and latent shard) and return its manifest rows; the caller appends them
    last, so a killed run never lists a sample whose files are missing."""
    records = []
    for p, img, ex in zip(plans, outs, extra):
        if img is not None:
            rel_img, rel_mask = write_pair(workdir, p["id"], img, p["label"])
        else:  # stopped early: never finished, so no image
            rel_img, rel_mask = None, f"masks/{p['id']}.png"
            write_png(workdir / rel_mask, p["label"])
        rel_new = f"new_masks/{p['id']}.png"
        write_png(workdir / rel_new, p["new_mask"])
        records.append({**_base_record(cfg, p, method), **ex, "image": rel_img, "mask": rel_mask,
                        "new_mask": rel_new})
    done_k = [k for k, img in enumerate(outs) if img is not None]
    if "latents" in info and done_k:  # shard first, manifest last: the manifest line commits both
        rel_lat = latent_store.save_shard(workdir, [plans[k]["id"] for k in done_k],
                                          *(info[key][done_k] for key in ("latents", "mask_latents", "masked_latents")))
        for k in done_k:
            records[k]["latents"] = rel_lat
    return records


def run_generate(cfg, datamodule, workdir: Path, upstream: dict, logger=None) -> dict[str, float]:
    """Generate ``cfg.generation.n_samples`` pairs into ``workdir`` (resumable).

    Args:
        cfg: Whole config; uses ``generation``, ``augment.method`` and ``diffusion.prompt``.
        datamodule: Set-up-able datamodule (``images``, ``masks``, ``ids``, ``split_indices``,
            ``prompt``, optional ``background_prompt``).
        workdir: Stage folder (stable across interruptions).
        upstream: ``{"finetune": Path}`` for ``diffusion``; unused for ``copy_paste``.
        logger: Optional object with ``log_metrics(dict, step)``; gets progress per batch.

    Returns:
        ``gen/n_samples``, ``gen/n_skipped``, ``gen/seconds`` (cumulative over resumes),
        ``gen/samples_per_s``, ``gen/fid``, ``gen/kid``, ``gen/kid_std``.
    """
    method = str(cfg.augment.method)
    if method not in METHODS:
        raise ValueError(f"the generate stage needs augment.method in {METHODS}, got {method!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if hasattr(datamodule, "setup"):
        datamodule.setup()
    images, masks, ids = datamodule.images, datamodule.masks, list(datamodule.ids)
    g = cfg.generation
    planner = Planner(images, masks, ids, datamodule.split_indices["train_few"], seed=int(g.seed),
                      n_samples=int(g.n_samples), scale_range=tuple(g.scale_range), elastic=float(g.elastic),
                      mask_source=str(g.mask_source), source=str(g.source),
                      normal_indices=getattr(datamodule, "split_indices", {}).get("normal"))
    if str(g.source) == "normal" and planner.kind == "lesion_free_region":
        warnings.warn("[generate] generation.source=normal, but no training image is lesion-free (and no "
                      "normal pool, data.n_normal, was drawn): new lesions go into the lesion-free regions of "
                      "lesion-bearing images, whose lesions stay in the label. To choose this explicitly set "
                      "generation.source=real; to paint into lesion-free images set data.n_normal=<k> on a "
                      "dataset that has them.")
    manifest = workdir / "manifest.jsonl"
    done = {r["id"] for r in read_manifest(manifest)}
    pending = [i for i in range(int(cfg.generation.n_samples)) if sample_id(i) not in done]
    progress_path = workdir / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else {"seconds": 0.0}

    model = load_model(cfg, upstream) if method == "diffusion" and pending else None
    donors = lesion_components(masks, planner.train) if method == "copy_paste" and pending else None
    prompt, negative = _prompts(cfg, model, datamodule)
    validator, t_val = None, time.perf_counter()
    if model is not None and early_reject_enabled(cfg):
        validator = load_validator(cfg, model, datamodule, workdir, prompt)
    elif cfg.validator.early_reject_t is not None and method == "diffusion":
        warnings.warn(f"validator.early_reject_t is set but validator.mode is '{cfg.validator.mode}': early "
                      f"rejection needs the single-step latent gate (mode=single_step); generating without it.")
    t_val = time.perf_counter() - t_val
    skipped, bs = [], max(1, int(cfg.generation.batch_size))
    for b in range(0, len(pending), bs):
        t0 = time.perf_counter()
        plans = [planner.plan(i) for i in pending[b:b + bs]]
        skipped += [p for p in plans if "skip_reason" in p]
        plans = [p for p in plans if "skip_reason" not in p]
        if not plans:
            continue
        info = {}
        if method == "diffusion":
            outs, extra, info = _diffusion_batch(cfg, model, plans, prompt, negative, validator, _num_classes(datamodule))
        else:
            outs, extra = copy_paste_batch(plans, images, masks, donors)
        records = _write_batch(workdir, cfg, method, plans, outs, extra, info)
        append_manifest(manifest, records)  # commit point of the batch
        progress["seconds"] += time.perf_counter() - t0
        atomic_write(progress_path, lambda f: f.write(json.dumps(progress)), mode="w")
        if logger is not None and hasattr(logger, "log_metrics"):
            logger.log_metrics({"gen/n_done": float(len(done) + b + len(plans))}, step=b // bs)

    metrics = _summary(cfg, workdir, manifest, skipped, progress, images[list(datamodule.split_indices["train"])])
    if validator is not None:
        metrics["gen/early_reject_validator_seconds"] = float(t_val)
    finished = [r for r in read_manifest(manifest) if not r.get("early_rejected")]
    if finished:
        save_grid(workdir / "grid.png", finished[:8], workdir, images)
    return metrics


def _summary(cfg, workdir: Path, manifest: Path, skipped: list, progress: dict, real: np.ndarray) -> dict[str, float]:
    """The stage's metrics: counts, seconds, and FID/KID of the finished samples against ``real``
    (uint8 (N,S,S,3)); the samples are read a batch at a time."""
    records = read_manifest(manifest)
    finished = [r for r in records if not r.get("early_rejected")]
    if skipped:
        write_manifest(workdir / "skipped.jsonl", [{"id": p["id"], "reason": p["skip_reason"]} for p in skipped])
    n_early = len(records) - len(finished)
    metrics = {"gen/n_samples": float(len(records)), "gen/n_skipped": float(len(skipped)),
               "gen/n_early_rejected": float(n_early), "gen/early_reject_rate": n_early / max(len(records), 1),
               "gen/seconds": float(progress["seconds"]),
               "gen/samples_per_s": float(len(records) / progress["seconds"]) if progress["seconds"] > 0 else 0.0}
    fake = ImageFiles([workdir / r["image"] for r in finished])
    metrics.update(fid_kid(real, fake, seed=int(cfg.generation.seed)))
    return metrics


def save_grid(path: Path, records: list, root: Path, images: np.ndarray) -> Path:
    """``grid.png``: one row per record: source | mask | generated | overlay (matplotlib Agg).

    The panels are tiled into one array and drawn on a single Axes: 32 separate Axes cost
    seconds of matplotlib layout for a picture of a few kilobytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
    rows = []
    for r in records:
        img = read_image(root / r["image"])
        label = read_mask(root / r["mask"])
        overlay = img.astype(np.float32)
        fg = label > 0
        overlay[fg] = 0.55 * overlay[fg] + 0.45 * colours[np.minimum(label[fg], 3)]
        mask_rgb = np.repeat((label * (255 // max(1, int(label.max()))))[..., None], 3, -1)
        panels = [images[r["source_index"]], mask_rgb, img, overlay]
        pad = np.full((img.shape[0], 2, 3), 255, np.uint8)  # white gutter between panels
        rows.append(np.concatenate(sum([[p.astype(np.uint8), pad] for p in panels], [])[:-1], 1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    mosaic = np.concatenate(rows[:-1], 0)
    fig = Figure(figsize=(6, 1.5 * len(records) + 0.4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, safe in workers
    ax = fig.add_axes((0.12, 0.0, 0.88, 1.0 - 0.3 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    side = img.shape[0] + 2
    for k, title in enumerate(("source", "mask", "generated", "overlay")):
        ax.text(k * side + side / 2, -2, title, ha="center", va="bottom", fontsize=8)
    for k, r in enumerate(records):
        ax.text(-3, k * side + side / 2, r["id"], ha="right", va="center", fontsize=7)
    ax.axis("off")
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), fsync=False)
