"""Gate: the IoU between what a validator sees in a sample and the mask the sample claims.

Latent gates (``single_step``, ``full``; DiffAug) judge generation's own latents, loaded from the
generate stage's ``latents/`` shards (no VAE) or encoded once; the ``pixel`` gate segments images.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from datamodules import latent_store
from datamodules.io import short_hash
from experiments.runner.builders import load_finetuned
from experiments.runner.gate_training import (PIXEL_SEGMENTER, load_pixel_segmenter, load_validator, save_validator,
                                       normal_pool, train_latent_validator, train_pixel_segmenter,
                                       validator_settings)
from experiments.tracking import is_rank_zero
from lightning_modules.gating.batching import gate_in_batches, in_chunks
from lightning_modules.gating.latent_gate import (encode_condition, encode_prompt, full_denoise_z0, mask_iou,
                                                  single_step_z0)
from lightning_modules.gating.unet_features import unet_features

FULL_STEPS = 50  # DDIM steps of the "full" gate (DiffAug's baseline)
LATENT_BATCH = 64  # samples per ε̂ call in the latent gates (all share the prompt embedding)


def stage_prompt(cfg, datamodule, rows: list) -> str:
    """The prompt the gate encodes: the one generation recorded in ``rows`` (manifest rows), else the
    config's, else the dataset's."""
    return next((r["prompt"] for r in rows if r.get("prompt")), None) or cfg.diffusion.prompt or datamodule.prompt


def device_of(cfg) -> torch.device:
    """The gate's device: CUDA when ``trainer.accelerator`` asks for it and one is available; under a
    launcher the rank's own GPU (its local rank), as Lightning's DDP gives each rank."""
    from experiments.runner.distributed import launcher

    want_gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto")
    if not (want_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    env = launcher()
    return torch.device("cuda", env.local_rank()) if env is not None else torch.device("cuda")


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

    features = bool(getattr(validator, "uses_unet_features", False))
    if features and mode != "single_step":
        raise ValueError(f"validator.features=unet_decoder works with validator.mode=single_step, not {mode}")

    @torch.no_grad()
    def gate(cond: dict, masks: torch.Tensor):
        z0, m_lat, mi_lat = (cond[k].to(device) for k in ("z0", "mask_lat", "masked_lat"))
        if features:  # the same ε̂ call's decoder features, classified pixel by pixel
            feats = unet_features(diffusion, z0, m_lat, mi_lat, text, t_eval, gen)
            pred = validator.predict_from_features(feats, masks.shape[-2:]).cpu().long()
            return mask_iou(pred, masks.cpu().long(), num_classes), pred
        if mode == "single_step":
            x, t_seg = single_step_z0(diffusion, z0, m_lat, mi_lat, text, t_eval, gen), t_eval
        else:
            x, t_seg = full_denoise_z0(diffusion, z0, m_lat, mi_lat, text, t_eval, full_steps, gen), 0
        pred = validator.predict_masks(x, t_seg, masks.shape[-2:], prompt=masks).cpu().long()
        return mask_iou(pred, masks.cpu().long(), num_classes), pred

    return gate


@torch.no_grad()
def encode_latents(diffusion, images: torch.Tensor, cond_masks: torch.Tensor, device: torch.device,
                   batch_size: int = 16) -> dict:
    """VAE latents + condition of (N,3,H,W) images under (N,H,W) condition masks, once per sample.

    The VAE sees :data:`~lightning_modules.gating.batching.ENCODE_BATCH` images per call whatever
    ``batch_size``: its activations at 512 px are about 0.6 GiB per image.
    """
    out = {"z0": [], "mask_lat": [], "masked_lat": []}
    encode = lambda *a: encode_condition(diffusion, *a)  # noqa: E731
    for i in range(0, len(images), batch_size):
        parts = in_chunks(encode, images[i:i + batch_size].to(device), cond_masks[i:i + batch_size].to(device))
        for k, v in zip(out, parts):
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


class LatentInputs:
    """The latent condition of generated samples, read a batch at a time (``inputs[i:j]`` -> dict).

    From the generate stage's ``latents/`` shards where every row of the batch has one (no VAE at all:
    DiffAug's latent-space validation), else the VAE encodes the batch's images once. ``sources``
    collects which of the two served ("generate", "vae").
    """

    def __init__(self, diffusion, gen_dir: Path, rows: list, images, cond_masks, device: torch.device):
        self.diffusion, self.gen_dir, self.rows, self.device = diffusion, Path(gen_dir), rows, device
        self.images, self.cond_masks, self.sources = images, cond_masks, set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: slice) -> dict:
        cond = latent_store.load_latents(self.gen_dir, self.rows[rows])
        self.sources.add("vae" if cond is None else "generate")
        return cond if cond is not None else encode_latents(self.diffusion, self.images[rows],
                                                            self.cond_masks[rows], self.device)


def gate_latents(mode: str, cfg, diffusion, validator, gen_dir: Path, rows: list, images, masks, cond_masks,
                 prompt: str, num_classes: int, device: torch.device, full_steps: int = FULL_STEPS,
                 batch_size: int = LATENT_BATCH, sink=None):
    """What the validate stage runs for a latent gate (timed as a whole by it and by the benchmark).

    Args:
        images / masks / cond_masks: (N,3,H,W) / (N,H,W) / (N,H,W) tensors or row views
            (:class:`datamodules.rows.LazyRows`), read ``batch_size`` rows at a time.
        sink: takes each batch's predictions (see :func:`~lightning_modules.gating.batching.gate_in_batches`).

    Returns ``(iou (N,), pred (N,H,W) or None with a sink, source)``: ``source`` says where the latents
    came from, "generate", "vae" or "generate+vae" (see :class:`LatentInputs`). The prompt is encoded once.
    """
    if not rows:  # every sample was rejected early (or none generated)
        return torch.zeros(0), torch.zeros((0, *masks.shape[1:]), dtype=torch.long), "none"
    inputs = LatentInputs(diffusion, gen_dir, rows, images, cond_masks, device)
    with torch.no_grad():
        text = encode_prompt(diffusion, prompt)
    gate = make_latent_gate(mode, cfg, num_classes, device, diffusion, validator, text, full_steps)
    ious, preds = gate_in_batches(gate, inputs, masks, batch_size, sink=sink)
    return ious, preds, "+".join(sorted(inputs.sources))


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


def validator_cache_path(cfg, upstream: dict, settings: dict) -> Path:
    """Where the validate stage keeps a latent validator trained with ``settings``.

    ``artifacts/gate_models/<finetune signature>-<hash>.pt``: the validator learns from the real pairs
    and the fine-tuned model's ε̂ only, not from the generated samples, so every generate run of one
    fine-tune (a guidance-scale sweep) shares it. The hash covers the settings, the data config and
    the base model (what a run without fine-tune uses for ε̂).
    """
    from omegaconf import OmegaConf

    source = Path(upstream["finetune"]).name if "finetune" in upstream else "base"
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "external_tests"}
    key = {"settings": settings, "data": data,
           "base_model": str(cfg.diffusion.base_model)}
    return Path(cfg.artifacts_dir) / "gate_models" / f"{source}-{short_hash(key)}.pt"


def reuse_validator(cfg, upstream: dict, settings: dict, given=None, use_cache: bool = True):
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


def load_diffusion(cfg, upstream: dict):
    """The fine-tuned model, or the base model for runs without a finetune stage (copy-paste)."""
    if "finetune" in upstream:
        return load_finetuned(cfg, upstream["finetune"]), "finetuned"
    from lightning_modules.diffusion import InpaintingDiffusion
    print(f"[validate] no finetune upstream: the {cfg.validator.mode} gate uses the base diffusion "
          f"'{cfg.diffusion.base_model}' for ε̂", flush=True)
    return InpaintingDiffusion.from_base(cfg.diffusion.base_model), "base (no finetune upstream)"


def gate(cfg, datamodule, workdir: Path, upstream: dict, gen, real, prompt: str, logger=None, diffusion=None,
         validator=None, segmenter=None, full_steps: int = FULL_STEPS, sink=None, validator_source=None,
         diffusion_source=None) -> dict:
    """Build (or reuse) the gate of ``cfg.validator.mode`` and score the generated samples with it.

    Args:
        gen: the generated samples (:func:`datamodules.synthetic.load_generated` as a namespace:
            ``rows, images, masks, cond_masks``, read a batch at a time). real: ``(images (N,3,S,S), masks
            (N,S,S))`` row views.
        diffusion / validator / segmenter: ready models (tests, benchmarks), else loaded or trained.
        sink: takes each batch's predictions (``sink(first row, pred (B,H,W))``) instead of "preds".
        validator_source / diffusion_source: what the given ``validator`` / ``diffusion`` is, for the
            description (default "given").

    Returns:
        ``{"ious" (n,), "preds" (n,H,W) or None with a sink, "gate" (image-space gate), "description", "metrics",
        "sanity_cache", "diffusion"}``: ``sanity_cache`` is where the real pairs' IoUs under this gate
        are kept (None for the pixel gate and for given models, which leave nothing to cache by key);
        ``diffusion`` the model the latent gates used (None for the pixel gate). ``metrics`` holds
        ``gen/validate_sps`` and, for the latent gates on ẑ0, ``gen/validator_prompted`` (1.0 prompted, 0.0 plain).
    """
    mode, device, n = str(cfg.validator.mode), device_of(cfg), len(gen.rows)
    ncls, few = int(datamodule.num_classes), datamodule.split_indices["train_few"]
    models_given = diffusion is not None or validator is not None  # tests/benchmarks: nothing to cache by key
    metrics, sanity_cache = {}, None
    if mode in ("single_step", "full"):
        diffusion, source = load_diffusion(cfg, upstream) if diffusion is None else (diffusion, diffusion_source or "given")
        diffusion = diffusion.to(device).eval() if hasattr(diffusion, "to") else diffusion
        settings = validator_settings(cfg, prompt, ncls)
        validator, val_src = reuse_validator(cfg, upstream, settings, validator, use_cache=not models_given)
        if validator is None:
            val_src = "trained here"
            # the datamodule's uint8 arrays: the bank converts and moves them a batch at a time
            validator = train_latent_validator(cfg, diffusion, datamodule.images[few], datamodule.masks[few],
                                               prompt, ncls, workdir, logger, pool=normal_pool(datamodule))
            if is_rank_zero() and not models_given:
                save_validator(validator_cache_path(cfg, upstream, settings), validator, settings)
        validator = validator.to(device) if hasattr(validator, "to") else validator
        # which validator judged: prompted (sees the intended mask; this suite's) or plain (DiffAug's);
        # the tables name it per row (experiments.reporting reads gen/validator_prompted)
        prompted = bool(getattr(validator, "prompted", cfg.validator.prompted))
        if not getattr(validator, "uses_unet_features", False):  # the feature validator takes no prompt at all
            metrics["gen/validator_prompted"] = float(prompted)
        start = time.time()  # the whole gate: latents (loaded or encoded) + prompt + ε̂ + validator
        ious, preds, lat_src = gate_latents(mode, cfg, diffusion, validator, Path(upstream["generate"]), gen.rows,
                                            gen.images, gen.masks, gen.cond_masks, prompt, ncls, device, full_steps,
                                            sink=sink)
        metrics["gen/validate_sps"] = n / max(time.time() - start, 1e-9)
        kind = "UNet-decoder-feature" if getattr(validator, "uses_unet_features", False) else \
            ("prompted" if prompted else "plain (DiffAug)")
        description = (f"{mode}@t{int(cfg.validator.t_eval)} on {source} diffusion; "
                       f"{kind} validator {validator_source or val_src}; latents from {lat_src}")
        if not models_given:
            # the real pairs' IoUs depend on the gate, not on θ: a θ sweep computes them once
            sanity_cache = validator_cache_path(cfg, upstream, settings).with_suffix(f".{mode}{full_steps}.real_ious.pt")
    elif segmenter is None and (Path(workdir) / PIXEL_SEGMENTER).is_file():  # trained by every rank (gate_model)
        segmenter = load_pixel_segmenter(Path(workdir) / PIXEL_SEGMENTER, cfg, datamodule).to(device)
        description = "pixel segmenter (trained by every rank)"
    elif segmenter is None:
        segmenter, description = train_pixel_segmenter(cfg, datamodule, workdir, logger).to(device), "pixel segmenter"
    else:
        description = "pixel segmenter (given)"
    image_gate = make_gate(mode, cfg, prompt, ncls, device, diffusion, validator, segmenter, full_steps)
    if mode == "pixel":
        start = time.time()
        ious, preds = gate_in_batches(image_gate, gen.images, gen.masks, sink=sink)
        metrics["gen/validate_sps"] = n / max(time.time() - start, 1e-9)
    return {"ious": ious, "preds": preds, "gate": image_gate, "description": description, "metrics": metrics,
            "sanity_cache": sanity_cache, "diffusion": diffusion}
