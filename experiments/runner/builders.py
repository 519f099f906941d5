"""The one place models are built from the config: the diffusion model and the segmenter.

Stages, the gate training and the benchmarks call these, so a new config key reaches every user
of a model (the gate's segmenter once drifted from the segment stage's). The Trainer has its own
one place, :mod:`experiments.runner.trainer`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_modules.diffusion import InpaintingDiffusion
from lightning_modules.segmenter import SegmenterModule


def build_diffusion(cfg: DictConfig) -> InpaintingDiffusion:
    """``InpaintingDiffusion.from_base`` with the fine-tune settings of ``cfg.diffusion``."""
    d = cfg.diffusion
    return InpaintingDiffusion.from_base(
        d.base_model, finetune=d.finetune, lora_rank=d.lora_rank, lora_alpha=d.lora_alpha, lora_targets=list(d.lora_targets),
        train_text_encoder=d.train_text_encoder, lr=d.lr, cond_dropout=d.cond_dropout, lesion_loss_weight=d.lesion_loss_weight)


_LAST_LOADED: dict = {}  # {key: model}: at most one fine-tuned model kept per process


def load_finetuned(cfg: DictConfig, workdir: str | Path) -> InpaintingDiffusion:
    """Rebuild the base of ``cfg.diffusion`` and load ``workdir/trained.safetensors`` (prompts included).

    The last model loaded is kept: the trials of a sweep share one fine-tune, and their generate and
    validate stages would otherwise rebuild it every time. Callers only run it (eval, no training).
    """
    path = Path(workdir) / "trained.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist; run the finetune stage first.")
    key = (str(path.resolve()), path.stat().st_mtime_ns,
           json.dumps(OmegaConf.to_container(cfg.diffusion, resolve=True), sort_keys=True, default=str))
    if key not in _LAST_LOADED:
        _LAST_LOADED.clear()
        _LAST_LOADED[key] = build_diffusion(cfg).load_trained(path).eval()
    return _LAST_LOADED[key]


def build_segmenter(cfg: DictConfig, datamodule: Any, total_steps: Optional[int] = None) -> SegmenterModule:
    """A fresh :class:`SegmenterModule` for ``cfg.segmenter`` and the datamodule's classes.

    Args:
        cfg: resolved config (``segmenter`` and ``data.small_lesion_area`` are read).
        datamodule: anything with ``num_classes`` and ``classes``.
        total_steps: length of the cosine schedule, or None for the Trainer's estimate.
    """
    s = cfg.segmenter
    return SegmenterModule(arch=s.arch, encoder=s.encoder, encoder_weights=s.encoder_weights,
                           num_classes=datamodule.num_classes, lr=s.lr, weight_decay=s.weight_decay,
                           min_lr_ratio=s.min_lr_ratio, small_lesion_area=cfg.data.small_lesion_area,
                           total_steps=total_steps, class_names=tuple(datamodule.classes),
                           encoder_depth=s.encoder_depth,
                           decoder_channels=[int(c) for c in s.decoder_channels] if s.decoder_channels else None)
