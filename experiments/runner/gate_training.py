"""Training (and persisting) the gate models: the latent validator and the pixel segmenter.

Not a stage: shared by the validate stage and, for early rejection, the generate stage; a validator trained in
generate is saved as ``validator.pt`` with its settings so validate reuses it instead of retraining.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from datamodules.io import atomic_write
from experiments.runner.builders import build_segmenter
from experiments.runner.trainer import build_trainer
from lightning_modules.feature_validator import FeatureValidator
from lightning_modules.gating.feature_bank import build_feature_bank
from lightning_modules.gating.pasted_pairs import PastedPairs
from lightning_modules.gating.validator_bank import AugmentedPairs, build_validator_bank
from lightning_modules.validator import LatentValidator

# validator.features -> the class a saved validator is rebuilt as
VALIDATOR_CLASSES = {"latent": LatentValidator, "unet_decoder": FeatureValidator}


PIXEL_SEGMENTER = "pixel_segmenter.pt"  # the pixel gate's segmenter, kept in the validate stage's folder


def _fit(module: L.LightningModule, loader: DataLoader, cfg, steps: int, ckpt_dir: Path, logger=None) -> None:
    """Train ``steps`` steps with checkpoint/resume from ``ckpt_dir/last.ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    import torch.distributed as dist

    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=max(1, steps // 4))
    # Under a launcher every rank joins (experiments.runner.distributed opened the process group): build_trainer's
    # DDP over the launcher's world. Otherwise one device: these models are small, and spawning DDP
    # processes (ddp_spawn) would cost more than it saves.
    joined = dist.is_available() and dist.is_initialized()
    single = {} if joined else {"devices": 1, "strategy": "auto"}
    trainer = build_trainer(cfg, ckpt_dir, logger=logger, callbacks=[ckpt], max_steps=steps, max_epochs=-1,
                            **single, deterministic=None, enable_progress_bar=False,
                            limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=10,
                            val_check_interval=None, check_val_every_n_epoch=1)
    last = ckpt_dir / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)


def train_latent_validator(cfg, diffusion, images, masks, prompt: str,
                           num_classes: int, workdir: Path, logger=None, pool=None) -> LatentValidator:
    """Train the :class:`LatentValidator` on real pairs (clean, ẑ0 estimates, noised) and return it (eval).

    Args:
        images: the real pairs' images, (N,3,H,W) float in [0,1] on any device or the datamodule's uint8
            (N,H,W,3) array; moved to the diffusion model's device a batch at a time.
        masks: (N,H,W) class indices.
        pool: uint8 (M,S,S,3) lesion-free images (the normal pool) for ``validator.pasted_pairs`` pasted
            pairs, or None.
        workdir: checkpoints go under ``workdir/checkpoints/validator``; the training items wait on disk in a
            temporary folder under ``workdir`` (removed when training ends).
    """
    v, seed = cfg.validator, int(cfg.generation.seed)
    t_focus = [int(v.t_eval)] + ([int(v.early_reject_t)] if v.early_reject_t is not None else [])
    pairs = AugmentedPairs(images, masks, int(v.augment_copies), seed=seed)
    if str(v.features) == "unet_decoder":
        return _train_feature_validator(cfg, diffusion, pairs, prompt, num_classes, Path(workdir), logger)
    if int(v.pasted_pairs):  # label-free pairs: the labelled lesions pasted into the normal pool
        if pool is None or not len(pool):
            raise ValueError(f"validator.pasted_pairs={v.pasted_pairs} needs a normal pool of lesion-free images: "
                             f"set data.n_normal (procedural data) or split 'normal', or validator.pasted_pairs=0.")
        pairs = PastedPairs(pairs, pool, int(v.pasted_pairs), seed=seed)
    # about as many ε̂ estimates in total whatever the number of copies (bank cost stays flat):
    # 9 per image without copies, a multiple of 3 (one per bank variant), at least 3
    per_image = max(3, 9 // max(1, int(v.augment_copies)) // 3 * 3)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _remove_stale_banks(workdir)
    # one per rank under a launcher; host and pid in the name tell a killed run's folder from a live one
    folder = Path(tempfile.mkdtemp(prefix=f"validator_bank_{socket.gethostname()}_{os.getpid()}_", dir=workdir))
    try:
        start = time.perf_counter()
        bank = build_validator_bank(diffusion, pairs, prompt, t_focus, folder, per_image=per_image, seed=seed)
        print(f"[gate] training data: {len(masks)} real pairs x {max(1, int(v.augment_copies))} copies "
              f"+ {int(v.pasted_pairs)} pasted -> "
              f"{len(bank)} items of {tuple(bank.arrays['x'].shape[1:])} latents on disk, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        L.seed_everything(seed, workers=True, verbose=False)
        model = LatentValidator(in_channels=bank.arrays["x"].shape[1], num_classes=num_classes, lr=v.lr,
                                train_steps=v.train_steps, num_train_timesteps=int(diffusion.num_train_timesteps),
                                alphas_cumprod=diffusion.alphas_cumprod.detach().cpu(),
                                noisy_t_max=max(t_focus) * 3 // 2 + 1, prompted=bool(v.prompted))
        sampler = RandomSampler(bank, replacement=True, num_samples=v.train_steps * 16,
                                generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(bank, batch_size=16, sampler=sampler, num_workers=0)
        _fit(model, loader, cfg, v.train_steps, workdir / "checkpoints" / "validator", logger)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model.eval()


def _train_feature_validator(cfg, diffusion, pairs, prompt: str, num_classes: int, workdir: Path,
                             logger=None) -> FeatureValidator:
    """The :class:`FeatureValidator` on the UNet decoder features of ``pairs`` at ``validator.t_eval`` (eval)."""
    v, seed = cfg.validator, int(cfg.generation.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    _remove_stale_banks(workdir)
    folder = Path(tempfile.mkdtemp(prefix=f"validator_bank_{socket.gethostname()}_{os.getpid()}_", dir=workdir))
    try:
        start = time.perf_counter()
        bank = build_feature_bank(diffusion, pairs, prompt, int(v.t_eval), folder, seed=seed)
        # background : class pixel ratio of the targets, counted one item at a time (the masks stay on disk)
        counts = sum(np.bincount(np.asarray(bank.masks[i]).ravel(), minlength=num_classes)[:num_classes]
                     for i in range(len(bank))).astype(np.float64)
        weights = [float(counts[0] / max(c, 1.0)) for c in counts]
        print(f"[gate] feature validator data: {len(pairs)} pairs x 3 (as is, misplaced, missing) -> {len(bank)} "
              f"items of {tuple(bank.feats.shape[1:])} UNet decoder features on disk, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        L.seed_everything(seed, workers=True, verbose=False)
        model = FeatureValidator(bank.feats.shape[1], num_classes, train_steps=int(v.train_steps), t_eval=int(v.t_eval),
                                 class_weights=weights)
        model.feature_mean.copy_(bank.mean), model.feature_std.copy_(bank.std)
        sampler = RandomSampler(bank, replacement=True, num_samples=int(v.train_steps) * 32,
                                generator=torch.Generator().manual_seed(seed))
        _fit(model, DataLoader(bank, batch_size=32, sampler=sampler, num_workers=0), cfg, int(v.train_steps),
             workdir / "checkpoints" / "validator", logger)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model.eval()


def _remove_stale_banks(workdir: Path) -> None:
    """Delete gate-data folders this host's killed processes left in ``workdir`` (their pid is gone)."""
    for folder in workdir.glob(f"validator_bank_{socket.gethostname()}_*_*"):
        pid = folder.name[len(f"validator_bank_{socket.gethostname()}_"):].split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def normal_pool(datamodule):
    """The datamodule's lesion-free pool images (uint8 (M,S,S,3), split ``normal``), or None without one."""
    idx = list(datamodule.split_indices.get("normal") or [])
    return datamodule.images[idx] if idx else None


def train_pixel_segmenter(cfg, datamodule, workdir: Path, logger=None):
    """A quick ``SegmenterModule`` on the real ``train_few`` pairs (the pixel-space gate)."""
    steps = int(cfg.validator.train_steps)
    L.seed_everything(int(cfg.generation.seed), workers=True, verbose=False)
    model = build_segmenter(cfg, datamodule, total_steps=steps)  # the segment stage's architecture, in full
    ds = datamodule.dataset("train_few", train_transforms=True)
    loader = DataLoader(ds, batch_size=min(int(cfg.data.batch_size), len(ds)), shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(int(cfg.generation.seed)))
    _fit(model, loader, cfg, steps, workdir / "checkpoints" / "pixel_segmenter", logger)
    return model.eval()


def save_pixel_segmenter(path: Path, model: L.LightningModule) -> Path:
    """The pixel gate's trained segmenter weights (``torch.save`` of the state dict, written atomically)."""
    return atomic_write(path, lambda f: torch.save(model.state_dict(), f))


def load_pixel_segmenter(path: Path, cfg, datamodule) -> L.LightningModule:
    """The segmenter :func:`save_pixel_segmenter` kept, rebuilt from the config (eval mode)."""
    model = build_segmenter(cfg, datamodule, total_steps=int(cfg.validator.train_steps))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def validator_settings(cfg, prompt: str, num_classes: int) -> dict:
    """Everything a trained latent validator depends on besides the diffusion model and the real pairs."""
    v = cfg.validator
    return {"t_eval": int(v.t_eval), "early_reject_t": None if v.early_reject_t is None else int(v.early_reject_t),
            "train_steps": int(v.train_steps), "lr": float(v.lr), "seed": int(cfg.generation.seed),
            "prompt": str(prompt), "num_classes": int(num_classes), "prompted": bool(v.prompted),
            "augment_copies": int(v.augment_copies),
            # added only when used, so validators cached before the key existed are still found
            **({"pasted_pairs": int(v.pasted_pairs)} if int(v.pasted_pairs) else {}),
            **({"features": str(v.features)} if str(v.features) != "latent" else {})}


def save_validator(path: Path, model, settings: dict) -> Path:
    """``torch.save`` of hparams + weights + settings (plain types; loads with ``weights_only=True``).

    ``model``: a :class:`LatentValidator` or a :class:`FeatureValidator` (``settings["features"]`` says which).
    """
    blob = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), "settings": settings}
    return atomic_write(path, lambda f: torch.save(blob, f))


def load_validator(path: Path, settings: dict):
    """The validator saved at ``path`` if it was trained with exactly ``settings``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("settings") != settings:
        return None
    model = VALIDATOR_CLASSES[settings.get("features", "latent")](**blob["hyper_parameters"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()
