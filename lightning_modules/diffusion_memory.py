"""Memory and speed options of the diffusion fine-tune (docs/gpus.md, "Fitting a GPU").

Everything here is what diffusers, peft, transformers, Lightning and torch already provide, wired
to the ``diffusion`` config keys:

* gradient checkpointing: ``UNet2DConditionModel.enable_gradient_checkpointing()`` (and
  ``gradient_checkpointing_enable`` of trained text encoders);
* mixed precision: Lightning's ``bf16-mixed`` / ``16-mixed`` autocast with fp32 master weights of
  what is trained; the frozen VAE and text encoders (and, under LoRA, the frozen UNet base) are
  held in half precision, trained weights cast back to fp32 with diffusers' ``cast_training_params``;
* memory-efficient attention: PyTorch's ``scaled_dot_product_attention`` through diffusers'
  ``AttnProcessor2_0`` (diffusers' default; :func:`set_attention` checks that it is active);
* fused AdamW (one kernel: no full-size temporary during the step) and 8-bit AdamW from
  bitsandbytes when installed;
* EMA of the trained weights (diffusers' ``EMAModel``) as a Lightning callback;
* the frozen VAE and text encoders moved off the accelerator once latents and prompts are cached.
"""
from __future__ import annotations

import logging

from typing import Iterable, List, Optional

import lightning as L
import torch

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed"}
OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit")
ATTENTION = ("sdpa", "eager")


def prepare_finetune(model, gradient_checkpointing: bool = False, mixed_precision: Optional[str] = None,
                     attention: str = "sdpa", optimizer: str = "adamw", ema_decay: Optional[float] = None,
                     offload_frozen: bool = False, grad_accum: int = 1):
    """Apply the memory options to ``model`` (an ``InpaintingDiffusion``) before the latents are cached.

    Args:
        gradient_checkpointing, mixed_precision (None | bf16 | fp16), attention, optimizer, ema_decay
        (None = no EMA), offload_frozen, grad_accum: the ``diffusion`` config keys of the same names.

    Returns:
        (callbacks, trainer overrides): Lightning callbacks (EMA, offload) and ``Trainer`` keywords
        (``precision``, ``accumulate_grad_batches``) to fit with.

    Raises:
        ImportError: ``adamw8bit`` without bitsandbytes (raised here, before any work is done).
    """
    if optimizer == "adamw8bit":
        require_bitsandbytes()
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"diffusion.optimizer='{optimizer}'; choose one of {', '.join(OPTIMIZERS)}.")
    model.optimizer_name = optimizer
    set_attention(model.unet, attention)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    overrides = {"accumulate_grad_batches": int(grad_accum)}
    if mixed_precision is not None:
        if mixed_precision not in HALF_DTYPES:
            raise ValueError(f"diffusion.mixed_precision='{mixed_precision}'; choose null, bf16 or fp16.")
        hold_frozen_in_half(model, mixed_precision)
        overrides["precision"] = LIGHTNING_PRECISION[mixed_precision]
    callbacks = []
    if ema_decay is not None:
        callbacks.append(EMACallback(ema_decay))
    if offload_frozen:
        callbacks.append(OffloadFrozen())
    return callbacks, overrides


class _DropEmptyFp32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def _quiet_empty_fp32_notice() -> None:
    """Drop diffusers' notice that a model cast with ``.to(dtype)`` has modules to keep in float32, when
    the list it names is empty: the SD VAE and UNet declare none, so every bf16 run printed a warning
    about nothing. A non-empty list still prints."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFp32Notice) for f in logger.filters):
        logger.addFilter(_DropEmptyFp32Notice())


def hold_frozen_in_half(model, precision: str) -> None:
    """Cast the frozen parts of an ``InpaintingDiffusion`` to half precision; trained weights stay fp32.

    Full fine-tune: the UNet (trained) stays fp32; the VAE and frozen text encoders go to half.
    LoRA: the UNet (and trained text encoders) go to half, then their adapters back to fp32, as
    diffusers' LoRA training scripts do. Autocast (Lightning's mixed precision) runs the maths in half.

    Args:
        model: ``InpaintingDiffusion``.
        precision: ``bf16`` or ``fp16``.
    """
    from diffusers.training_utils import cast_training_params

    _quiet_empty_fp32_notice()
    dtype = HALF_DTYPES[precision]
    model.vae.to(dtype)
    encoders = model._text_encoders()
    for encoder in encoders:
        if not model.train_text_encoder or model.finetune == "lora":
            encoder.to(dtype)
    if model.finetune == "lora":
        model.unet.to(dtype)
        cast_training_params([model.unet] + (encoders if model.train_text_encoder else []), dtype=torch.float32)
    model._prompt_cache = None  # re-encoded by the half encoders


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass: the UNet and every trained text encoder."""
    model.unet.enable_gradient_checkpointing()
    if model.train_text_encoder:
        for encoder in model._text_encoders():
            # non-reentrant: frozen embeddings feed LoRA layers, which must still get gradients
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_attention(unet, attention: str = "sdpa") -> None:
    """Use and check the attention implementation of every attention layer of ``unet``.

    ``sdpa`` is diffusers' default ``AttnProcessor2_0`` (``torch.nn.functional.scaled_dot_product_attention``:
    flash / memory-efficient kernels on GPU, never the full attention matrix); ``eager`` is the
    classic ``AttnProcessor`` that materialises it (a reference only).

    Raises:
        ValueError: unknown name. RuntimeError: a layer does not use the requested processor.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention not in ATTENTION:
        raise ValueError(f"diffusion.attention='{attention}'; choose one of {', '.join(ATTENTION)}.")
    want = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    if attention == "eager":
        unet.set_attn_processor(AttnProcessor())
    wrong = [name for name, proc in unet.attn_processors.items() if type(proc) is not want]
    if wrong:
        raise RuntimeError(f"diffusion.attention='{attention}' expects {want.__name__} in every attention layer, but "
                           f"{len(wrong)} use another (e.g. {wrong[0]}: {type(unet.attn_processors[wrong[0]]).__name__}).")


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 1e-2):
    """The fine-tune's optimizer.

    ``adamw``: torch's AdamW (foreach on GPU: during the step it holds one fp32 temporary the size of
    the trained weights); ``adamw_fused``: torch's fused AdamW (no temporary); ``adamw8bit``:
    bitsandbytes' AdamW8bit (states in 8 bit: 2 bytes per trained weight instead of 8).

    Raises:
        ImportError: ``adamw8bit`` without bitsandbytes installed.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"diffusion.optimizer='{name}'; choose one of {', '.join(OPTIMIZERS)}.")
    if name == "adamw8bit":
        bnb = require_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if name == "adamw_fused" else None)


def require_bitsandbytes():
    """Import bitsandbytes or raise a one-line error saying what to do."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("diffusion.optimizer=adamw8bit needs bitsandbytes, which is not installed: "
                          "`pip install bitsandbytes` (a CUDA machine), or set diffusion.optimizer=adamw.") from err
    return bitsandbytes


class EMACallback(L.Callback):
    """Exponential moving average of the trained weights (diffusers' ``EMAModel``).

    Updated after every optimizer step (so once per accumulated batch), saved in Lightning
    checkpoints (resume continues it) and copied into the model when fitting ends, so the weights
    saved afterwards, and used for generation, are the EMA weights.

    Args:
        decay: EMA decay, e.g. 0.999 (diffusers' warm-up ``(1 + n) / (10 + n)`` caps it early on).
    """

    def __init__(self, decay: float):
        self.decay = float(decay)
        self.ema = None
        self._pending: Optional[dict] = None

    def _params(self, pl_module) -> List[torch.nn.Parameter]:
        return pl_module.trainable_parameters()

    def _ensure(self, pl_module) -> None:
        if self.ema is None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._params(pl_module), decay=self.decay)
            if self._pending is not None:
                self.ema.load_state_dict(self._pending)
                self._pending = None
            self.ema.to(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        self._ensure(pl_module)

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        # Lightning calls this right after each optimizer step (not on accumulation-only batches)
        self._ensure(pl_module)
        self.ema.step(self._params(pl_module))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.ema is not None:
            self.ema.copy_to(self._params(pl_module))

    def state_dict(self) -> dict:
        if self.ema is None:
            return self._pending or {}
        state = self.ema.state_dict()
        state["shadow_params"] = [p.detach().cpu() for p in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.ema is None:
            self._pending = dict(state_dict)
        else:
            self.ema.load_state_dict(state_dict)


class OffloadFrozen(L.Callback):
    """Move the frozen VAE and text encoders off the accelerator while the UNet trains.

    The latents were cached before fitting; the prompt embeddings are cached here, on the
    accelerator, before the encoders leave it. They come back when fitting ends.
    """

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.cache_prompts()
        pl_module.vae.to("cpu")
        if not pl_module.train_text_encoder:
            for encoder in pl_module._text_encoders():
                encoder.to("cpu")

    def on_fit_end(self, trainer, pl_module) -> None:
        pl_module.vae.to(pl_module.device)
        for encoder in pl_module._text_encoders():
            encoder.to(pl_module.device)
