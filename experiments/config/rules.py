"""The rules a loaded config must keep: choices, the label budget, memory options, ranges, external sets."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from datamodules.procedural import NO_NORMAL_POOL

from experiments.config.external import external_specs
from experiments.config.ranges import check_ranges
from experiments.config.schema import STAGES, ConfigError

CHOICES = {
    "diffusion.finetune": ("lora", "full", "none"),
    "diffusion.attention": ("sdpa", "eager"),
    "diffusion.optimizer": ("adamw", "adamw_fused", "adamw8bit"),
    "generation.scheduler": ("ddim", "dpm"),
    "generation.source": ("real", "normal"),
    "generation.mask_source": ("real", "blob", "mixed"),
    "validator.mode": ("single_step", "full", "pixel", "none"),
    "validator.quality_features": ("random_resnet18", "vae"),
    "validator.features": ("latent", "unet_decoder"),
    "validator.judge": ("final", "fold_ensemble"),
    "augment.method": ("none", "standard", "copy_paste", "diffusion"),
    "data.transforms": ("standard", "none"),
}


def validate(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"'{key}' is '{value}'; choose one of {', '.join(choices)}.")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"Unknown stage(s) {unknown} in 'stages'; choose from {', '.join(STAGES)}.")
    if not 0.0 <= cfg.validator.iou_threshold <= 1.0:
        raise ConfigError("'validator.iou_threshold' must lie in [0, 1].")
    q = cfg.validator.calibrate_real_pass
    if q is not None and not 0.0 < q <= 1.0:
        raise ConfigError("'validator.calibrate_real_pass' must lie in (0, 1] (a share of real pairs), or be null.")
    if not 0.0 <= cfg.validator.calibrate_min_threshold <= 1.0:
        raise ConfigError("'validator.calibrate_min_threshold' must lie in [0, 1].")
    k = cfg.validator.crossfit_folds
    if k != 0 and (k < 2 or cfg.validator.mode == "pixel"):
        raise ConfigError(f"'validator.crossfit_folds' is {k}; use 0 (off) or K >= 2 folds, with a latent gate "
                          f"(validator.mode single_step or full), not the pixel gate.")
    if q is not None and cfg.validator.early_reject_t is not None:
        raise ConfigError("'validator.calibrate_real_pass' and 'validator.early_reject_t' cannot be combined: early "
                          "rejection runs during generation, before θ is calibrated on real pairs. Unset one of them.")
    _validate_features(cfg.validator)
    if cfg.validator.judge == "fold_ensemble" and (k < 2 or cfg.validator.early_reject_t is not None):
        raise ConfigError(f"'validator.judge=fold_ensemble' averages the cross-fitted fold validators over every "
                          f"sample; 'validator.crossfit_folds' is {k} and 'validator.early_reject_t' is "
                          f"{cfg.validator.early_reject_t}: set validator.crossfit_folds=4 (or K >= 2) and no early "
                          f"rejection (run during generation, by another validator), or validator.judge=final.")
    if cfg.augment.ratio < 0:
        raise ConfigError("'augment.ratio' must be >= 0 (0 means no synthetic pairs).")
    _validate_budget(cfg)
    _validate_memory_options(cfg.diffusion)
    check_ranges(cfg, ConfigError)  # every count, size and ratio
    external_specs(cfg, ConfigError)


def _validate_features(v: DictConfig) -> None:
    """``validator.features=unet_decoder`` reads the single-step gate's own UNet call: nothing else has one."""
    if v.features != "unet_decoder":
        return
    clash = {"validator.mode": v.mode == "full", "validator.early_reject_t": v.early_reject_t is not None,
             "validator.pasted_pairs": int(v.pasted_pairs) > 0}
    for key, bad in clash.items():
        if bad:
            raise ConfigError(f"'validator.features=unet_decoder' works with validator.mode=single_step, no "
                              f"early rejection and no pasted pairs; '{key}' is {OmegaConf.select(v, key.split('.', 1)[1])}. "
                              f"Change '{key}' or set validator.features=latent.")


def _validate_memory_options(d: DictConfig) -> None:
    if d.mixed_precision not in (None, "bf16", "fp16"):
        raise ConfigError(f"'diffusion.mixed_precision' is '{d.mixed_precision}'; choose null (trainer.precision), bf16 or fp16.")
    if d.grad_accum < 1:
        raise ConfigError(f"'diffusion.grad_accum' is {d.grad_accum}; it must be >= 1 (batches per optimizer step).")
    if d.ema_decay is not None and not 0.0 < d.ema_decay < 1.0:
        raise ConfigError(f"'diffusion.ema_decay' is {d.ema_decay}; it must lie in (0, 1) (e.g. 0.999), or be null for no EMA.")


def resolve_budget(cfg: DictConfig) -> None:
    """``data.n_val`` given as a share of ``data.n_real`` becomes its count (0.25 of 16 -> 4), so the
    same budget reads the same in every config and stage signature."""
    n_val, n_real = cfg.data.n_val, cfg.data.n_real
    if isinstance(n_val, bool) or (n_val is not None and not isinstance(n_val, (int, float))):
        raise ConfigError(f"'data.n_val' is {n_val!r}; give a count of validation pairs (e.g. 4), a share of "
                          f"data.n_real in (0, 1) (e.g. 0.25), or null.")
    if isinstance(n_val, float) and 0 < n_val < 1 and n_real is not None:
        cfg.data.n_val = max(1, int(n_val * int(n_real)))
    elif isinstance(n_val, float) and n_val >= 1 and n_val == int(n_val):
        cfg.data.n_val = int(n_val)


def _validate_budget(cfg: DictConfig) -> None:
    d, a = cfg.data, cfg.augment
    if d.n_val is not None:
        if d.n_val <= 0 or (d.n_val >= 1 and d.n_val != int(d.n_val)):
            raise ConfigError(f"'data.n_val' is {d.n_val}; give a count >= 1 or a share in (0, 1) of data.n_real.")
        if d.n_real is not None and d.n_val >= d.n_real:
            raise ConfigError(f"'data.n_val' ({d.n_val}) must be below 'data.n_real' ({d.n_real}): the validation "
                              f"pairs come out of the n_real labelled pairs and train_few keeps the rest.")
    if d.n_normal < 0:
        raise ConfigError(f"'data.n_normal' is {d.n_normal}; it must be >= 0 (0 = no pool of lesion-free sources).")
    kind = str(d.name)[len("procedural_"):] if str(d.name).startswith("procedural_") else None
    if d.n_normal > 0 and kind in NO_NORMAL_POOL:
        # caught here, not when the data is built: a grid checks every cell's config before any runs
        raise ConfigError(f"'data.n_normal' is {d.n_normal}, but {d.name} has no lesion-free images to draw "
                          f"from: set data.n_normal=0.")
    if d.test_pool is not None:
        if not str(d.name).startswith("procedural_"):
            raise ConfigError(f"'data.test_pool' is for procedural datasets; '{d.name}' has its own test split: "
                              f"remove data.test_pool.")
        if d.test_pool < 1:
            raise ConfigError(f"'data.test_pool' is {d.test_pool}; it must be >= 1 (or null).")
    if a.synthetic_only and (a.method not in ("diffusion", "copy_paste") or a.ratio <= 0):
        raise ConfigError("'augment.synthetic_only' trains on synthetic pairs alone: it needs augment.method "
                          "diffusion or copy_paste and augment.ratio > 0.")
