"""The config schema: one dataclass per section, the stages, and the error every config check raises."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional



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
    # The label budget (README, "Your own data"). Null/0: no budget split (a validation split of its own).
    # Validation pairs taken out of n_real (n_real is then every labelled pair of the run): a count (4) or a
    # share of n_real (0.25 -> n_real // 4, resolved to the count on loading); null: a validation split of its own
    n_val: Any = None
    n_normal: int = 0  # pool of lesion-free source images outside the budget (no masks used); 0 = none
    # procedural only: the test split is this many pairs of a reserved test stream, the same for every
    # seed and disjoint from every training pool; null: test is split from the run's own content
    test_pool: Optional[int] = None
    # test sets from elsewhere, tested with the selected checkpoint and never trained, validated or selected on:
    # {name: cvc_clinicdb, root: DIR}, {name: folder, root: DIR}, {name: procedural_polyp, center: b} (experiments/config/external.py)
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
    # Memory and speed (docs/gpus.md, "Fitting a GPU"; benchmarks.memory estimates each at SD size). At
    # their defaults they are neutral signature keys (cache.signatures.NEUTRAL): cached fine-tunes stay valid.
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
    # who judges the generated samples: final (the validator trained on train_few) | fold_ensemble (the
    # mean of the K cross-fitted fold validators, which together saw every labelled pair; needs
    # crossfit_folds >= 2; see docs/gate-trust.md)
    judge: str = "final"
    t_eval: int = 200  # timestep for the single-step clean-latent estimate
    # what the latent validator reads: latent (ẑ0 of the single-step estimate; DiffAug) | unet_decoder (the
    # decoder features of that same UNet call, classified pixel by pixel; see docs/gate-trust.md)
    features: str = "latent"
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
