"""The valid range of every count, size and ratio of the config, checked before anything runs.

A value outside its range would otherwise reach code that crashes on it deep inside a stage
(``data.n_real=0`` fails in ``torch.cat`` mid fine-tune, leaving a half-written stage folder), or
that silently does nothing useful (``trainer.max_steps=0``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

# key: (low, high, what the value is). Bounds are inclusive; None = unbounded. A key whose schema
# type is Optional may also be null (checked by OmegaConf); only set values are range-checked.
INT_RANGES: Dict[str, Tuple[Optional[int], Optional[int], str]] = {
    "seed": (0, None, "a seed"),
    "data.image_size": (16, 4096, "the side in pixels every image is resized to"),
    "data.n_real": (1, None, "the few-shot subset size (null = all of train)"),
    "data.split_seed": (0, None, "a seed"),
    "data.n_procedural": (3, None, "the procedural pool size (train, val and test need one each)"),
    "data.procedural_seed": (0, None, "a seed"),
    "data.batch_size": (1, None, "a batch size"),
    "data.num_workers": (0, 256, "a number of DataLoader worker processes"),
    "trainer.log_every_n_steps": (1, None, "a step interval"),
    "trainer.check_val_every_n_epoch": (1, None, "an epoch interval"),
    "trainer.val_check_interval": (1, None, "a step interval (null = every epoch)"),
    "segmenter.encoder_depth": (3, 5, "the number of encoder stages"),
    "diffusion.lora_rank": (1, None, "the LoRA rank"),
    "diffusion.lora_alpha": (1, None, "the LoRA scale numerator"),
    "diffusion.steps": (1, None, "a number of fine-tuning steps"),
    "diffusion.batch_size": (1, None, "a batch size"),
    "diffusion.checkpoint_every": (1, None, "a step interval"),
    "generation.n_samples": (1, None, "a number of synthetic pairs"),
    "generation.steps": (1, 1000, "a number of denoising steps"),
    "generation.batch_size": (1, None, "a batch size"),
    "generation.guide_dilate_px": (0, 1024, "a dilation in pixels"),
    "generation.seed": (0, None, "a seed"),
    "validator.t_eval": (1, 999, "a diffusion timestep"),
    "validator.early_reject_t": (1, 999, "a diffusion timestep (null = no early rejection)"),
    "validator.augment_copies": (1, 1000, "the real pairs plus transformed copies (1 = real only)"),
    "validator.pasted_pairs": (0, 100000, "a number of pasted label-free pairs (0 = none)"),
    "validator.train_steps": (1, None, "a number of training steps"),
    "validator.erode_px": (0, 64, "an erosion in pixels"),
    "augment.seed": (0, None, "a seed"),
}

# key: (low, high, low_open, high_open, what). Open bounds exclude the bound itself.
FLOAT_RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool, bool, str]] = {
    "data.val_fraction": (0.0, 1.0, True, True, "a share of the pairs"),
    "data.test_fraction": (0.0, 1.0, True, True, "a share of the pairs"),
    "data.small_lesion_area": (0.0, 1.0, True, True, "a share of the image"),
    "segmenter.lr": (0.0, 10.0, True, False, "a learning rate"),
    "segmenter.weight_decay": (0.0, None, False, False, "a weight decay"),
    "segmenter.min_lr_ratio": (0.0, 1.0, False, False, "a share of the learning rate"),
    "segmenter.collapse_dice": (0.0, 1.0, False, False, "a Dice score"),
    "diffusion.lr": (0.0, 10.0, True, False, "a learning rate"),
    "diffusion.cond_dropout": (0.0, 1.0, False, True, "a probability"),
    "diffusion.lesion_loss_weight": (0.0, None, False, False, "a loss weight"),
    "diffusion.background_fraction": (0.0, 1.0, False, True, "a share of training crops"),
    "generation.guidance_scale": (0.0, 100.0, False, False, "a guidance scale"),
    "generation.elastic": (0.0, 1.0, False, False, "a jitter strength"),
    "validator.lr": (0.0, 10.0, True, False, "a learning rate"),
    "validator.quality_quantile": (0.0, 1.0, True, False, "a quantile"),
    "validator.near_copy_quantile": (0.0, 1.0, False, True, "a quantile"),
    "augment.ratio": (0.0, 100.0, False, False, "synthetic pairs per real pair (0 = none)"),
}


def _interval(low, high, low_open=False, high_open=False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _outside(value: float, low, high, low_open=False, high_open=False) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return True
    return ((low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high)))


def check_ranges(cfg: DictConfig, error: Any = ValueError) -> None:
    """Raise ``error(message)`` naming the first value outside its range and the valid range."""

    def fail(key: str, value: Any, rule: str, what: str) -> None:
        raise error(f"'{key}' is {value!r}, but it is {what} and must be {rule}. Set a value "
                    f"{rule} (e.g. {key}=<value> on the command line or in the YAML file).")

    for key, (low, high, what) in INT_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and _outside(value, low, high):
            fail(key, value, _interval(low, high), what)
    for key, (low, high, lo_open, hi_open, what) in FLOAT_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and _outside(float(value), low, high, lo_open, hi_open):
            fail(key, value, _interval(low, high, lo_open, hi_open), what)
    _check_relations(cfg, fail)


def _check_relations(cfg: DictConfig, fail) -> None:
    """Checks that involve more than one key."""
    d, t, g = cfg.data, cfg.trainer, cfg.generation
    if d.val_fraction + d.test_fraction >= 1.0:
        fail("data.val_fraction", d.val_fraction, f"below {1 - d.test_fraction:.3g} "
             f"(1 - data.test_fraction), so that the train split keeps pairs",
             "a share of the pairs")
    for key in ("trainer.max_epochs", "trainer.max_steps"):
        value = OmegaConf.select(cfg, key)
        if value == 0 or value < -1:
            fail(key, value, ">= 1, or -1 for no limit", "a training length")
    if t.max_epochs == -1 and t.max_steps == -1:
        fail("trainer.max_steps", t.max_steps, ">= 1 when trainer.max_epochs is -1 (else "
             "training never ends)", "a training length")
    sr = list(g.scale_range)
    if len(sr) != 2 or not 0 < sr[0] <= sr[1] <= 10:
        fail("generation.scale_range", sr, "two numbers [low, high] with 0 < low <= high <= 10",
             "the range of generated lesion scales")
    dc = cfg.segmenter.decoder_channels
    if dc is not None and (len(dc) != cfg.segmenter.encoder_depth or min(dc) < 1):
        fail("segmenter.decoder_channels", list(dc), f"null or {cfg.segmenter.encoder_depth} "
             f"positive numbers (one per encoder stage, segmenter.encoder_depth)", "channel counts")
    if cfg.diffusion.finetune == "lora" and not list(cfg.diffusion.lora_targets):
        fail("diffusion.lora_targets", [], "a non-empty list of module names (e.g. [to_q, to_k, "
             "to_v, to_out.0])", "the modules LoRA adapts")
