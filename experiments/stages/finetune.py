"""Fine-tune stage: adapt the inpainting diffusion base to the few real image–mask pairs.

Each real pair is VAE-encoded once into a latent bank (:mod:`lightning_modules.diffusion_bank`):
a lesion variant under the lesion prompt and lesion-free background variants under the background
prompt; the UNet (LoRA or full) then trains on bank batches only.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from omegaconf import DictConfig

from datamodules.io import short_hash
from experiments.cache.base_identity import base_identity
from experiments.cache.signatures import subtree
from experiments.runner.builders import build_diffusion
from experiments.runner.trainer import build_trainer
from lightning_modules.diffusion_bank import LatentBankDataset, build_inpainting_bank, variant_weights
from lightning_modules.diffusion_memory import prepare_finetune
from lightning_modules.progress import step_bar

# Bump when this stage's code changes what it produces for the same config: its cached results (and,
# through the upstream signatures, everything downstream) are recomputed. 0 adds nothing to the hash.
VERSION = 0


def inputs(cfg: DictConfig) -> Dict[str, Any]:
    """The config values this stage's result depends on (its part of the signature).

    The base enters by its content (:mod:`experiments.cache.base_identity`): re-pretraining the shipped
    ``tiny`` base recomputes every fine-tune, and a local base mounted at another path does not.
    """
    diffusion = subtree(cfg, "diffusion")
    if diffusion["base_model"] != "tiny":
        diffusion["base_model"] = "local folder"  # the path is not the model; its content is below
    return {"data": subtree(cfg, "data"), "diffusion": diffusion, "precision": cfg.trainer.precision,
            "base": short_hash(base_identity(cfg.diffusion.base_model))}


def background_prompt_for(datamodule) -> str:
    """The dataset's lesion-free prompt (procedural kinds define one; else a generic one)."""
    text = getattr(datamodule, "background_prompt", None)
    if text:
        return text
    from datamodules.procedural import PROCEDURAL_KINDS

    kind = PROCEDURAL_KINDS.get(getattr(datamodule, "modality", ""))
    return kind.background_prompt if kind else f"{getattr(datamodule, 'modality', 'medical')} image of normal tissue"


def _trainer(cfg, workdir: Path, logger, callbacks: Sequence, max_steps: int, train_batches: int, **overrides):
    # steps, not epochs, bound a fine-tune; there is no validation loader
    return build_trainer(cfg, workdir, logger=logger, callbacks=callbacks, max_steps=max_steps,
                         train_batches=train_batches, max_epochs=-1, num_sanity_val_steps=0, limit_val_batches=0,
                         **overrides)


def _memory_options(model, d):
    """Apply the ``diffusion`` memory keys (docs/gpus.md, "Fitting a GPU"); returns (callbacks, Trainer overrides)."""
    return prepare_finetune(model, gradient_checkpointing=d.gradient_checkpointing, mixed_precision=d.mixed_precision,
                            attention=d.attention, optimizer=d.optimizer, ema_decay=d.ema_decay,
                            offload_frozen=d.offload_frozen, grad_accum=d.grad_accum)


def finetune_diffusion(cfg, datamodule, workdir, logger=None):
    """Fine-tune ``cfg.diffusion.base_model`` on ``datamodule``'s ``train_few`` pairs.

    Checkpoints every ``checkpoint_every`` steps to ``workdir/checkpoints`` (trained weights only,
    and the EMA when ``ema_decay`` is set) and resumes from ``last.ckpt``; writes
    ``workdir/trained.safetensors`` (the EMA weights when EMA is on: generation uses them).

    Returns:
        (model, metrics) with ``ft/loss`` (last logged), ``ft/steps``, ``ft/seconds``.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    d, workdir = cfg.diffusion, Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    datamodule.setup()
    idx = datamodule.split_indices["train_few"]
    model = build_diffusion(cfg)
    model.set_prompts([d.prompt or datamodule.prompt, background_prompt_for(datamodule)])
    if d.finetune == "none" or d.steps <= 0:
        model.save_trained(workdir / "trained.safetensors")
        return model, {"ft/loss": float("nan"), "ft/steps": 0.0, "ft/seconds": time.time() - start}
    callbacks, overrides = _memory_options(model, d)
    # VAE-encode at most 64 images of 64 px at once and as many pixels at larger sizes: at
    # 512 px that is one image (0.6 GiB of VAE activations in fp32), where 64 would need 40 GiB
    # (benchmarks.memory's tracker on the SD VAE)
    chunk = min(64, max(1, 64 * 64 * 64 // int(datamodule.images.shape[1] * datamodule.images.shape[2])))
    bank = build_inpainting_bank(model, datamodule.images[idx], datamodule.masks[idx], 1, 2, n_background=4,
                                 flips=True, seed=cfg.data.split_seed, chunk=chunk)
    print(f"[finetune] latent cache: {len(idx)} pairs (and their mirror images) -> {len(bank['kind'])} regions, "
          f"latents {tuple(bank['z0'].shape[1:])}, {time.time() - start:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    sampler = torch.utils.data.WeightedRandomSampler(variant_weights(bank, d.background_fraction),
                                                     d.steps * d.batch_size * d.grad_accum,
                                                     replacement=True, generator=gen)
    loader = torch.utils.data.DataLoader(LatentBankDataset(bank), batch_size=d.batch_size, sampler=sampler, num_workers=0)
    ckpt_dir = workdir / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=max(1, d.checkpoint_every), save_last=True, save_top_k=1)
    trainer = _trainer(cfg, workdir, logger, [ckpt, *step_bar("fine-tune")] + callbacks, d.steps, len(loader), **overrides)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(model, train_dataloaders=loader, ckpt_path=str(last) if last.is_file() else None)
    model.save_trained(workdir / "trained.safetensors")
    if d.mixed_precision is not None:  # frozen parts were cast to half: return the model generation will load
        model = build_diffusion(cfg).load_trained(workdir / "trained.safetensors")
    loss = trainer.callback_metrics.get("ft/loss")
    return model, {"ft/loss": float(loss) if loss is not None else float("nan"), "ft/steps": float(trainer.global_step),
                   "ft/seconds": time.time() - start}


def run_finetune(cfg, datamodule, workdir, upstream=None, logger=None) -> dict:
    """Pipeline entry (``experiments.runner.pipeline.STAGES``): fine-tune, return metrics only."""
    return finetune_diffusion(cfg, datamodule, workdir, logger=logger)[1]
