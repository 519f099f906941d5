"""Latent-diffusion inpainting model: fine-tuning (LoRA / full / none) and guided sampling.

The UNet sees ``[z_t (C), mask (1), masked-image latents (C)]`` (SD-inpainting layout, C = 4)
plus a text embedding. Lesion regions are trained under the lesion prompt and lesion-free
background blobs under the background prompt (the prototype's lesson: one condition for both
yields ghost lesions); at sampling the background prompt is the negative prompt of CFG.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.io import atomic_write
from lightning_modules.synthesis import sampler as _sampler
from lightning_modules.tokenizer import encode_text, encode_text_sdxl, unpack_sdxl
from lightning_modules.tiny_base import load_components

FINETUNE_MODES = ("lora", "full", "none")
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class InpaintingDiffusion(L.LightningModule):
    """Inpainting diffusion model wrapping stock diffusers / transformers components.

    Args:
        unet: 9-channel ``UNet2DConditionModel``.
        vae: ``AutoencoderKL`` (frozen).
        text_encoder: ``CLIPTextModel`` (frozen unless ``train_text_encoder``).
        tokenizer: its ``CLIPTokenizer``.
        text_encoder_2, tokenizer_2: SDXL's second encoder (``CLIPTextModelWithProjection``) and
            tokenizer; given, the UNet also gets the pooled text embedding and the size ``time_ids``.
        scheduler: the base's noise scheduler (its config seeds DDPM/DDIM/DPM schedulers).
        finetune: ``lora`` (peft adapters), ``full`` (all UNet weights, MedDiff-FT) or ``none``.
        lora_rank, lora_alpha, lora_targets: peft ``LoraConfig`` of the UNet adapters.
        train_text_encoder: also train the text encoder (LoRA in lora mode, fully in full mode).
        lr: AdamW learning rate.
        cond_dropout: probability a training prompt is replaced by the null prompt "" (for CFG).
        lesion_loss_weight: extra ε-MSE weight inside the inpainted region.
        base_model: where the base came from (recorded in saved weights).
        optimizer: ``adamw``, ``adamw_fused`` or ``adamw8bit`` (:func:`~lightning_modules.diffusion_memory.make_optimizer`).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, finetune: str = "lora", lora_rank: int = 8,
                 lora_alpha: int = 8, lora_targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                 train_text_encoder: bool = False, lr: float = 1e-4, cond_dropout: float = 0.1,
                 lesion_loss_weight: float = 0.0, base_model: str = "tiny", text_encoder_2=None, tokenizer_2=None,
                 optimizer: str = "adamw"):
        super().__init__()
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune='{finetune}'; choose one of {', '.join(FINETUNE_MODES)}.")
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.is_sdxl = text_encoder_2 is not None
        self.scheduler_config = dict(scheduler.config)
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.finetune, self.lr, self.cond_dropout, self.optimizer_name = finetune, lr, cond_dropout, optimizer
        self.lesion_loss_weight, self.base_model = lesion_loss_weight, str(base_model)
        self.train_text_encoder = train_text_encoder and finetune != "none"
        self.lora_config = dict(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(lora_targets))
        self.vae.requires_grad_(False)
        for encoder in self._text_encoders():
            encoder.requires_grad_(False)
        self.unet.requires_grad_(finetune == "full")
        if finetune == "lora":
            from peft import LoraConfig

            # gaussian init: B != 0 would change the base at step 0; peft's default (B = 0) keeps it.
            self.unet.add_adapter(LoraConfig(init_lora_weights=True, **self.lora_config))
            if self.train_text_encoder:
                for encoder in self._text_encoders():
                    encoder.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=TEXT_LORA_TARGETS))
        elif finetune == "full" and self.train_text_encoder:
            for encoder in self._text_encoders():
                encoder.requires_grad_(True)
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.prompt_texts: List[str] = [""]  # index 0 is always the null prompt
        self._prompt_cache: Optional[torch.Tensor] = None
        self.strict_loading = False  # Lightning checkpoints hold only the trained weights
        self.train()

    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (from_pretrained returns eval-mode modules)."""
        super().train(mode)
        self.vae.eval()
        if not self.train_text_encoder:
            for encoder in self._text_encoders():
                encoder.eval()
        return self

    def _text_encoders(self) -> list:
        return [self.text_encoder] + ([self.text_encoder_2] if self.is_sdxl else [])

    def _text_encoder_names(self) -> List[str]:
        return ["text_encoder"] + (["text_encoder_2"] if self.is_sdxl else [])

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_base(cls, base_model: str = "tiny", **finetune_kwargs) -> "InpaintingDiffusion":
        """Load ``"tiny"`` (shipped folder) or a local SD-1.5 / SD-2 / SDXL inpainting diffusers folder."""
        comps, path = load_components(base_model)
        return cls(**comps, base_model=str(base_model), **finetune_kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def set_prompts(self, prompts: Sequence[str]) -> None:
        """Training prompt table; a bank's ``prompt_idx`` indexes ``[""] + prompts``."""
        self.prompt_texts = [""] + [p for p in prompts]
        self._prompt_cache = None

    @property
    def lesion_prompt(self) -> str:
        """Prompt the lesion regions were trained under ("" if none set)."""
        return self.prompt_texts[1] if len(self.prompt_texts) > 1 else ""

    @property
    def background_prompt(self) -> str:
        """Prompt of lesion-free regions: the negative prompt at sampling."""
        return self.prompt_texts[2] if len(self.prompt_texts) > 2 else ""

    # ----------------------------------------------------------------------------- latents / text
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> float scaled latents (B,C,H/f,W/f) (posterior mean: deterministic)."""
        dist = self.vae.encode(x.to(self.device, self.vae.dtype) * 2 - 1).latent_dist
        return dist.mean.float() * self.vae.config.scaling_factor

    def encode_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latents of the masked image; masked pixels are 0 in [-1,1] (0.5 in [0,1]) as in SD.

        Args:
            x: (B,3,H,W) in [0,1]. mask: (B,1,H,W), 1 = region to inpaint.
        """
        m = mask.to(x.dtype)
        return self.encode_images(x * (1 - m) + 0.5 * m)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B,C,h,w) -> images (B,3,H,W) in [0,1]."""
        x = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    @staticmethod
    def mask_to_latent(mask: torch.Tensor, size) -> torch.Tensor:
        """(B,1,H,W) pixel mask -> (B,1,h,w): a latent cell is masked if any of its pixels is,
        so small lesions never vanish at latent resolution."""
        return F.adaptive_max_pool2d(mask.float(), tuple(size))

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> text embedding (B,L,D); for SDXL the packed (B,L+1,D1+D2) of :func:`encode_text_sdxl`."""
        if self.is_sdxl:
            return encode_text_sdxl((self.tokenizer, self.tokenizer_2), (self.text_encoder, self.text_encoder_2),
                                    list(prompts))
        return encode_text(self.tokenizer, self.text_encoder, list(prompts))

    def _prompt_table(self) -> torch.Tensor:
        """(P,L,D) embeddings of ``prompt_texts``; cached unless the text encoder trains."""
        if self.train_text_encoder:
            return self.encode_prompts(self.prompt_texts)
        if self._prompt_cache is None:
            self.cache_prompts()
        if self._prompt_cache.device != self.device:  # the encoders may have left the accelerator
            self._prompt_cache = self._prompt_cache.to(self.device)
        return self._prompt_cache

    @torch.no_grad()
    def cache_prompts(self) -> None:
        """Encode ``prompt_texts`` once (frozen text encoders), before the encoders may be offloaded."""
        self._prompt_cache = self.encode_prompts(self.prompt_texts)

    # ----------------------------------------------------------------------------- UNet
    def predict_eps(self, z_t, t, mask_lat, masked_image_lat, text_emb) -> torch.Tensor:
        """ε̂ of the UNet.

        Args:
            z_t: (B,C,h,w) noisy latents. t: int or (B,) timesteps.
            mask_lat: (B,1,h,w). masked_image_lat: (B,C,h,w). text_emb: (B,L,D).

        Returns:
            (B,C,h,w) predicted noise (v-prediction bases are converted to ε).
        """
        out = self._unet(z_t, t, mask_lat, masked_image_lat, text_emb)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            a = self._alpha(t, z_t)
            out = a.sqrt() * out + (1 - a).sqrt() * z_t
        return out

    def _unet(self, z_t, t, mask_lat, masked_image_lat, text_emb):
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=z_t.device)
        t = t.to(z_t.device).expand(z_t.shape[0])
        x = torch.cat([z_t, mask_lat.to(z_t.dtype), masked_image_lat.to(z_t.dtype)], dim=1)
        if not self.is_sdxl:
            return self.unet(x, t, encoder_hidden_states=text_emb.to(z_t.dtype)).sample
        states, pooled = unpack_sdxl(text_emb.to(z_t.dtype), self.text_encoder_2.config.projection_dim)
        # SDXL's size conditioning: original size, crop corner (0, 0), target size, in pixels
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        h, w = z_t.shape[-2] * factor, z_t.shape[-1] * factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=z_t.device, dtype=z_t.dtype).expand(z_t.shape[0], 6)
        return self.unet(x, t, encoder_hidden_states=states,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def _alpha(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device).long().expand(like.shape[0])
        return self.alphas_cumprod.to(like.device)[t].view(-1, 1, 1, 1).to(like.dtype)

    # ----------------------------------------------------------------------------- training
    def training_loss(self, batch: dict) -> torch.Tensor:
        """ε-MSE (+ ``lesion_loss_weight`` × MSE inside the region) on one bank batch.

        Args:
            batch: ``z0`` (B,C,h,w), ``mask_lat`` (B,1,h,w), ``masked_lat`` (B,C,h,w),
                ``prompt_idx`` (B,) int64 into ``prompt_texts``.
        """
        z0 = batch["z0"]
        b = z0.shape[0]
        idx = batch["prompt_idx"].clone()
        idx[torch.rand(b, device=z0.device) < self.cond_dropout] = 0  # condition dropout -> CFG
        text = self._prompt_table()[idx]
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.num_train_timesteps, (b,), device=z0.device)
        z_t = self.noise_scheduler.add_noise(z0, noise, t)
        target = noise
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z0, noise, t)
        err = (self._unet(z_t, t, batch["mask_lat"], batch["masked_lat"], text) - target) ** 2
        loss = err.mean()
        if self.lesion_loss_weight > 0:
            m = batch["mask_lat"]
            loss = loss + self.lesion_loss_weight * (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1)
        return loss

    def training_step(self, batch, batch_idx):
        loss = self.training_loss(batch)
        self.log("ft/loss", loss, prog_bar=True, batch_size=batch["z0"].shape[0])
        return loss

    def trainable_parameters(self) -> List[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        from lightning_modules.diffusion_memory import make_optimizer

        return make_optimizer(self.trainable_parameters(), self.optimizer_name, lr=self.lr, weight_decay=1e-2)

    # ----------------------------------------------------------------------------- weights
    def trained_state_dict(self) -> dict:
        """Only the trained weights: LoRA adapters (peft format) or the full UNet (+ text encoder)."""
        out = {}
        if self.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            out.update({f"unet.{k}": v for k, v in get_peft_model_state_dict(self.unet).items()})
            if self.train_text_encoder:
                for name in self._text_encoder_names():
                    out.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(getattr(self, name)).items()})
        elif self.finetune == "full":
            out.update({f"unet.{k}": v for k, v in self.unet.state_dict().items()})
            if self.train_text_encoder:
                for name in self._text_encoder_names():
                    out.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save_trained(self, path: str | Path) -> Path:
        """Write the trained weights to a safetensors file (atomically)."""
        from safetensors.torch import save

        meta = {"finetune": self.finetune, "base_model": self.base_model, "train_text_encoder": str(self.train_text_encoder),
                "prompt_texts": json.dumps(self.prompt_texts), **{f"lora_{k}": str(v) for k, v in self.lora_config.items()}}
        data = save(self.trained_state_dict(), metadata=meta)  # the same bytes save_file writes
        return atomic_write(path, lambda f: f.write(data))

    def load_trained(self, path: str | Path) -> "InpaintingDiffusion":
        """Load weights written by :meth:`save_trained` into a module built with the same settings."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("finetune", self.finetune) != self.finetune:
            raise ValueError(f"'{path}' holds finetune='{meta['finetune']}' weights; this model was built with "
                             f"finetune='{self.finetune}'. Build it with the same diffusion config.")
        if "prompt_texts" in meta:  # the prompts it was trained under travel with the weights
            self.set_prompts(json.loads(meta["prompt_texts"])[1:])
        state = load_file(str(path))
        for name in ["unet"] + self._text_encoder_names():
            part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if not part:
                continue
            module = getattr(self, name)
            if self.finetune == "lora":
                from peft.utils import set_peft_model_state_dict

                res = set_peft_model_state_dict(module, part)
                if getattr(res, "unexpected_keys", None):
                    raise ValueError(f"'{path}': unexpected LoRA keys for {name}, e.g. {res.unexpected_keys[:3]}.")
            else:
                module.load_state_dict(part, strict=True)
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Keep Lightning checkpoints small: only trainable weights (the base is reloaded from disk).
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def inpaint(self, source, mask, prompts, negative_prompts=None, guidance_scale: float = 4.0, steps: int = 25,
                scheduler: str = "ddim", guiding_mask: bool = True, guide_dilate_px: int = 6, generator=None,
                step_callback=None, **kwargs):
        """Guided inpainting; see :func:`lightning_modules.synthesis.sampler.inpaint`.

        Returns:
            (B,3,H,W) in [0,1], equal to ``source`` outside ``mask``.
        """
        return _sampler.inpaint(self, source, mask, prompts, negative_prompts, guidance_scale=guidance_scale, steps=steps,
                                scheduler=scheduler, guiding_mask=guiding_mask, guide_dilate_px=guide_dilate_px,
                                generator=generator, step_callback=step_callback, **kwargs)
