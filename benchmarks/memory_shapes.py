"""Stable-Diffusion-shaped inpainting models from their published architecture configs (no download).

The configs are those of the published ``unet/``, ``vae/`` and ``text_encoder*/`` ``config.json``
files of SD-1.5 inpainting (runwayml/stable-diffusion-inpainting) and SDXL inpainting
(diffusers/stable-diffusion-xl-1.0-inpainting-0.1), written out here. Weights are random: the
memory of a training step depends on shapes and dtypes only. ``scale`` divides every width, for
models small enough to train for real on a CPU (the benchmark's validation).
"""
from __future__ import annotations

import contextlib

import torch

SD15_UNET = dict(
    in_channels=9, out_channels=4, sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SDXL_UNET = dict(
    in_channels=9, out_channels=4, sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
CLIP_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG14 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="epsilon", clip_sample=False, steps_offset=1)


def _scaled(cfg: dict, scale: int, keys=("block_out_channels",)) -> dict:
    out = dict(cfg)
    for k in keys:
        out[k] = tuple(c // scale for c in cfg[k])
    return out


def _small_text(cfg: dict, scale: int) -> dict:
    # a validation model keeps the hidden width (the UNet cross-attends to it) but little else:
    # the text encoder is frozen and only resident during a fine-tune step
    return dict(cfg, vocab_size=1000, num_hidden_layers=1, intermediate_size=cfg["intermediate_size"] // scale) \
        if scale > 1 else cfg


def build_components(model: str = "sd15", scale: int = 1, device: str = "meta") -> dict:
    """UNet, VAE, text encoder(s) and scheduler of an SD-shaped inpainting base.

    Args:
        model: ``sd15`` (SD-1.5 inpainting: 9-channel UNet, CLIP ViT-L/14, SD VAE) or ``sdxl``
            (SDXL inpainting: adds OpenCLIP ViT-bigG/14 with its pooled projection).
        scale: divide every UNet width by this (1 = the published shape; widths must stay divisible
            by 32, the GroupNorm groups); any scale > 1 also divides the VAE's widths by 4.
        device: ``meta`` builds without allocating any memory; ``cpu`` builds real weights.

    Returns:
        ``InpaintingDiffusion`` constructor kwargs minus the fine-tune settings (``tokenizer`` None:
        the fine-tune trains on cached prompt embeddings).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if model not in ("sd15", "sdxl"):
        raise ValueError(f"model='{model}'; choose sd15 or sdxl.")
    unet_cfg = _scaled(SD15_UNET if model == "sd15" else SDXL_UNET, scale)
    ctx = torch.device(device) if device == "meta" else contextlib.nullcontext()
    with ctx:
        comps = dict(unet=UNet2DConditionModel(**unet_cfg), vae=AutoencoderKL(**_scaled(SD_VAE, 4 if scale > 1 else 1)),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**_small_text(CLIP_L14, scale))), tokenizer=None)
        if model == "sdxl":
            comps["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**_small_text(CLIP_BIGG14, scale)))
    comps["scheduler"] = DDPMScheduler(**SCHEDULER)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in comps:
            comps[name].eval()
    return comps


def prompt_table_shape(components: dict) -> tuple:
    """Shape (P,L,D) of the cached prompt table (null, lesion, background prompts) the UNet reads."""
    hidden = components["text_encoder"].config.hidden_size
    if "text_encoder_2" in components:  # SDXL: both encoders' states plus the pooled "token"
        return (3, 78, hidden + components["text_encoder_2"].config.hidden_size)
    return (3, 77, hidden)
