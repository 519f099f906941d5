"""Config schema (dataclasses), YAML loading and dotlist overrides.

A config is ``OmegaConf.merge(schema defaults, YAML file, CLI dotlist)``. The schema is
structured, so an unknown or misspelt key raises :class:`ConfigError` naming the key and the
closest valid one: a sweep runs unattended, and a typo must not silently do nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from datamodules.errors import did_you_mean


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


@dataclass
class DataConfig:
    """Which dataset, how it is split, and how samples are loaded."""

    name: str = "procedural_polyp"
    root: Optional[str] = None  # folder in the dataset's published layout (None for procedural)
    image_size: int = 64  # square side every image/mask is resized to
    n_real: Optional[int] = 16  # few-shot subset of the training split; None = all of it
    split_seed: int = 0  # seeds the split and the few-shot subset
    val_fraction: float = 0.15  # used where the dataset has no official split
    test_fraction: float = 0.15
    n_procedural: int = 400  # pool size of procedural datasets (before splitting)
    procedural_seed: int = 0  # content seed of procedural datasets
    batch_size: int = 8
    num_workers: int = 0
    cache_dir: str = "outputs/cache"  # decoded, resized images (keyed by file list and size)
    transforms: str = "standard"  # albumentations preset for training: standard | none
    small_lesion_area: float = 0.02  # lesions under this image fraction count as "small"
    split_file: Optional[str] = None  # your own split: JSON lists train, val, test (and train_few) of ids
    # The label budget (README, "Your own data"). Null/0 keep the behaviour from before these keys existed.
    # Validation pairs taken out of n_real (n_real is then every labelled pair of the run): a count (4) or a
    # share of n_real (0.25 -> n_real // 4, resolved to the count on loading); null: a validation split of its own
    n_val: Any = None
    n_normal: int = 0  # pool of lesion-free source images outside the budget (no masks used); 0 = none
    # procedural only: the test split is this many pairs of a reserved test stream, the same for every
    # seed and disjoint from every training pool; null: test is split from the run's own content
    test_pool: Optional[int] = None
    # test sets from elsewhere, tested with the selected checkpoint and never trained, validated or selected on:
    # {name: cvc_clinicdb, root: DIR}, {name: folder, root: DIR}, {name: procedural_polyp, center: b} (experiments/external_tests.py)
    external_tests: List[Any] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """Lightning Trainer arguments shared by every training stage."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = 40
    max_steps: int = -1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    val_check_interval: Optional[int] = None  # validate every N steps (across epochs) instead
    deterministic: bool = False


@dataclass
class SegmenterConfig:
    """Downstream smp segmenter and its optimisation."""

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: Optional[str] = None  # None, or a local weights file; never a download
    encoder_depth: int = 5  # smp default; the tiny CPU presets use 4
    decoder_channels: Optional[List[int]] = None  # None: smp default (Unet-style archs only)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    collapse_dice: float = 0.05  # best val/dice under this is reported as a collapse


@dataclass
class DiffusionConfig:
    """Latent-diffusion inpainting base and how it is fine-tuned."""

    base_model: str = "tiny"  # "tiny" (shipped) or a local diffusers-format inpainting folder
    finetune: str = "lora"  # lora | full | none
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    lr: float = 1e-4
    steps: int = 300
    batch_size: int = 8
    cond_dropout: float = 0.1  # prompt dropped to the null prompt, so CFG works
    lesion_loss_weight: float = 0.0  # extra ε-MSE weight inside the lesion mask
    background_fraction: float = 0.3  # share of training crops that inpaint background
    prompt: Optional[str] = None  # None: the dataset's clinical prompt
    checkpoint_every: int = 100
    # Memory and speed (docs/gpus.md, "Fitting a GPU"; benchmarks.memory estimates each at SD size). The
    # defaults are the behaviour before these keys existed, so cached fine-tunes keep their signatures.
    gradient_checkpointing: bool = False  # recompute UNet (and trained text encoder) activations in backward: same result, less memory
    mixed_precision: Optional[str] = None  # null (trainer.precision) | bf16 | fp16: autocast with fp32 trained weights; frozen VAE, text encoders (LoRA: UNet base) held in half
    grad_accum: int = 1  # Lightning accumulate_grad_batches: one optimizer step per grad_accum batches (effective batch = batch_size x grad_accum)
    ema_decay: Optional[float] = None  # null = off; e.g. 0.999: EMA of the trained weights (diffusers EMAModel), saved as the trained weights and used for generation
    attention: str = "sdpa"  # sdpa: torch scaled_dot_product_attention (diffusers' default AttnProcessor2_0, memory-efficient; checked active) | eager (reference)
    optimizer: str = "adamw"  # adamw | adamw_fused (no full-size temporary in the step) | adamw8bit (bitsandbytes, needs it installed)
    offload_frozen: bool = False  # move VAE + text encoders off the accelerator once latents and prompt embeddings are cached
    allow_upscaled_tiny: bool = False  # run the shipped 64 px tiny base at a larger data.image_size (a smoke test; preflight refuses it otherwise)


@dataclass
class GenerationConfig:
    """Synthetic image–mask pair generation."""

    n_samples: int = 64
    guidance_scale: float = 4.0
    steps: int = 25
    scheduler: str = "ddim"  # ddim | dpm
    batch_size: int = 16
    source: str = "real"  # real (MedDiff-FT: lesion placed elsewhere) | normal (DiffAug)
    guiding_mask: bool = True  # dynamic adaptive guiding mask (blended latent denoising)
    guide_dilate_px: int = 6  # dilation of the guiding mask at t = T, shrinking to 0 at t = 0
    mask_source: str = "mixed"  # real | blob | mixed
    scale_range: List[float] = field(default_factory=lambda: [0.6, 1.4])
    elastic: float = 0.2  # boundary jitter strength
    seed: int = 0


@dataclass
class ValidatorConfig:
    """Quality gate for synthetic pairs."""

    mode: str = "single_step"  # single_step | full | pixel | none
    iou_threshold: float = 0.7
    # None: θ as given (DiffAug). A share q in (0, 1]: θ is lowered (never raised) to the IoU that q of
    # held-out real pairs reach, for validators too weak to give real pairs θ (see docs/gate.md)
    calibrate_real_pass: Optional[float] = None
    # the calibrated θ never drops below this: at θ = 0 a gate passes pairs with no overlap at all
    calibrate_min_threshold: float = 0.05
    # 0: the gate is checked (and θ calibrated) on the validation pairs. K >= 2: on every labelled pair,
    # cross-fitted over K folds of train_few + val (latent gates; see docs/gate-trust.md)
    crossfit_folds: int = 0
    t_eval: int = 200  # timestep for the single-step clean-latent estimate
    prompted: bool = True  # the latent validator also sees the intended mask (verification, not segmentation)
    augment_copies: int = 8  # the real pairs plus transformed copies the latent validator trains on
    # label-free pairs the latent validator also trains on: labelled lesions pasted into the normal pool
    # (data.n_normal); 0 = none (see docs/gate-trust.md)
    pasted_pairs: int = 0
    early_reject_t: Optional[int] = None
    train_steps: int = 300
    lr: float = 1e-3
    quality_filter: bool = True
    quality_quantile: float = 0.95  # reject generated images farther than this real quantile
    # the quality filter's features: random_resnet18 (a fixed, randomly initialised resnet18: knows no
    # domain; the old default) | vae (pooled statistics of the diffusion model's VAE latents)
    quality_features: str = "random_resnet18"
    near_copy_quantile: float = 0.02
    erode_px: int = 1


@dataclass
class AugmentConfig:
    """How real and synthetic pairs are mixed for the segmenter."""

    method: str = "standard"  # none | standard | copy_paste | diffusion
    ratio: float = 1.0  # synthetic : real
    seed: int = 0
    # train on round(ratio * n_train_few) synthetic pairs alone (no real pair; validation stays real)
    synthetic_only: bool = False


@dataclass
class TrackingConfig:
    """MLflow tracking; MLFLOW_TRACKING_URI wins over ``uri`` when set."""

    uri: str = "sqlite:///outputs/mlflow.db"
    artifact_root: str = "outputs/mlruns"
    experiment: Optional[str] = None  # None: the config's ``name``
    enabled: bool = True


@dataclass
class Config:
    """One experiment: data, models, stages, tracking."""

    name: str = "procedural_polyp_baseline"
    seed: int = 0  # segmenter seed; paired across methods
    output_dir: str = "outputs"
    artifacts_dir: str = "artifacts"
    stages: List[str] = field(default_factory=lambda: ["segment"])
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    validator: ValidatorConfig = field(default_factory=ValidatorConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


STAGES = ("finetune", "generate", "validate", "segment")


def _valid_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    for name, value in node.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(value, DictConfig):
            keys.extend(_valid_keys(value, dotted + "."))
    return keys


def _unknown_key_error(key: str, source: str) -> ConfigError:
    valid = _valid_keys(OmegaConf.structured(Config))
    hint = did_you_mean(key, valid, cutoff=0.5)
    return ConfigError(f"Unknown config key '{key}' in {source}.{hint} Valid keys are listed in experiments/config.py.")


def _check_keys(data: Any, schema: DictConfig, source: str, prefix: str = "") -> None:
    """Raise on the first key of ``data`` that the schema does not define."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(dotted, source)
        child = schema[key]
        if isinstance(child, DictConfig):
            _check_keys(value, child, source, dotted + ".")


def read_yaml(path: str | Path, kind: str = "Config") -> Any:
    """Parse a YAML file with OmegaConf; a syntax error or an unreadable file is a ConfigError.

    The message names the file, the line and column of a syntax error, and what to do.
    """
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{kind} file '{path}'{where}: YAML syntax error ({problem}); fix the "
                          f"file (mind indentation, ':' after each key and matching quotes/brackets).") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{kind} file '{path}' is not UTF-8 text ({err.reason}); save it as UTF-8.") from err
    except OSError as err:
        raise ConfigError(f"cannot read {kind.lower()} file '{path}' ({err.strerror or err}); make it readable "
                          f"by you (e.g. chmod u+r) or copy it somewhere you can read.") from err


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                overrides_source: str = "the command line") -> DictConfig:
    """Merge schema defaults, an optional YAML file and dotlist overrides.

    Args:
        path: YAML experiment file; its keys must exist in :class:`Config`.
        overrides: ``key=value`` strings, e.g. ``["generation.guidance_scale=5"]``.
        overrides_source: Where the overrides came from, named in errors (e.g. a grid file).

    Returns:
        The resolved, read-only-keyed config.

    Raises:
        ConfigError: unknown key, malformed override, wrong value type, missing file.
    """
    schema = OmegaConf.structured(Config)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Pass a YAML file such as experiments/configs/procedural_polyp_baseline.yaml.")
        raw = OmegaConf.to_container(read_yaml(path), resolve=False) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, trainer:, ...), "
                              f"not a {type(raw).__name__}.")
        _check_keys(raw, schema, str(path))
        merged = _merge(merged, OmegaConf.create(raw), str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' in {overrides_source} is not of the form key=value "
                              f"(e.g. trainer.max_epochs=5).")
        merged = _merge(merged, _dotlist(item, overrides_source), overrides_source)
    _resolve_budget(merged)
    _validate(merged)
    return merged


def _dotlist(item: str, source: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([item])
    except Exception as err:  # omegaconf's grammar errors (e.g. an unclosed bracket) share no base class
        raise ConfigError(f"Override '{item}' in {source} cannot be parsed ({str(err).splitlines()[0]}); "
                          f"quote or fix its value (e.g. key='[1, 2]').") from err


def _merge(base: DictConfig, extra: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key or err.key), source) from err
    except ValidationError as err:
        raise ConfigError(f"Invalid value for '{err.full_key}' in {source}: {err.msg.splitlines()[0]}") from err


_CHOICES = {
    "diffusion.finetune": ("lora", "full", "none"),
    "diffusion.attention": ("sdpa", "eager"),
    "diffusion.optimizer": ("adamw", "adamw_fused", "adamw8bit"),
    "generation.scheduler": ("ddim", "dpm"),
    "generation.source": ("real", "normal"),
    "generation.mask_source": ("real", "blob", "mixed"),
    "validator.mode": ("single_step", "full", "pixel", "none"),
    "validator.quality_features": ("random_resnet18", "vae"),
    "augment.method": ("none", "standard", "copy_paste", "diffusion"),
    "data.transforms": ("standard", "none"),
}


def _validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
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
    if cfg.augment.ratio < 0:
        raise ConfigError("'augment.ratio' must be >= 0 (0 means no synthetic pairs).")
    _validate_budget(cfg)
    _validate_memory_options(cfg.diffusion)
    from experiments.config_ranges import check_ranges  # every count, size and ratio

    check_ranges(cfg, ConfigError)
    from experiments.external_tests import external_specs

    external_specs(cfg, ConfigError)


def _validate_memory_options(d: DictConfig) -> None:
    if d.mixed_precision not in (None, "bf16", "fp16"):
        raise ConfigError(f"'diffusion.mixed_precision' is '{d.mixed_precision}'; choose null (trainer.precision), bf16 or fp16.")
    if d.grad_accum < 1:
        raise ConfigError(f"'diffusion.grad_accum' is {d.grad_accum}; it must be >= 1 (batches per optimizer step).")
    if d.ema_decay is not None and not 0.0 < d.ema_decay < 1.0:
        raise ConfigError(f"'diffusion.ema_decay' is {d.ema_decay}; it must lie in (0, 1) (e.g. 0.999), or be null for no EMA.")


def _resolve_budget(cfg: DictConfig) -> None:
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
    if d.test_pool is not None:
        if not str(d.name).startswith("procedural_"):
            raise ConfigError(f"'data.test_pool' is for procedural datasets; '{d.name}' has its own test split: "
                              f"remove data.test_pool.")
        if d.test_pool < 1:
            raise ConfigError(f"'data.test_pool' is {d.test_pool}; it must be >= 1 (or null).")
    if a.synthetic_only and (a.method not in ("diffusion", "copy_paste") or a.ratio <= 0):
        raise ConfigError("'augment.synthetic_only' trains on synthetic pairs alone: it needs augment.method "
                          "diffusion or copy_paste and augment.ratio > 0.")


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (logged to MLflow as ``config.yaml``)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
