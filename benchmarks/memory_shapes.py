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


def _added_token(content: str) -> dict:
    # the serialisation of a special token in the published SD tokenizer configs (transformers' older format)
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_sd_tokenizer(folder):
    """A tokenizer folder in the published SD file format: ``vocab.json`` and ``merges.txt`` of a CLIP BPE (the
    project's small vocabulary) with the published ``tokenizer_config.json`` and ``special_tokens_map.json``
    (special tokens as ``"__type": "AddedToken"`` objects). Returns the folder as a Path."""
    import json

    from lightning_modules.tokenizer import END, START, write_tiny_vocab

    tok = write_tiny_vocab(folder)
    special = {"bos_token": _added_token(START), "eos_token": _added_token(END), "pad_token": END,
               "unk_token": _added_token(END)}
    (tok / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"add_prefix_space": False, **special, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
         "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}, indent=2))
    return tok


def write_sd15_inpainting_folder(out, scale: int = 5, seed: int = 0):
    """A folder in the published SD-1.5-inpainting layout, random weights, widths divided by ``scale``.

    ``unet/``, ``vae/``, ``text_encoder/`` (config.json + diffusion_pytorch_model / model .safetensors),
    ``scheduler/scheduler_config.json``, ``model_index.json`` and ``tokenizer/`` in the published file
    format: ``vocab.json`` and ``merges.txt`` of a CLIP BPE (the project's small vocabulary,
    :func:`lightning_modules.tokenizer.write_tiny_vocab`) with the ``tokenizer_config.json`` and
    ``special_tokens_map.json`` of the published folder (special tokens as ``"__type": "AddedToken"``
    objects). What a user's download looks like to the loader, with nothing downloaded.

    Args:
        out: the folder to write (made).
        scale: width divisor (5: a 9-channel UNet of about 37 M parameters).
        seed: seeds the random weights.

    Returns:
        ``out`` as a Path.
    """
    import json
    from pathlib import Path

    from lightning_modules.tokenizer import END, START

    out = Path(out)
    torch.manual_seed(seed)
    comps = build_components("sd15", scale, "cpu")
    tok = write_sd_tokenizer(out / "tokenizer")
    ids = json.loads((tok / "vocab.json").read_text())
    text = comps["text_encoder"].config  # its special ids are the vocabulary's (the pooled output reads eos)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = ids[START], ids[END], ids[END]
    for name in ("unet", "vae", "text_encoder"):
        comps[name].save_pretrained(out / name, safe_serialization=True)
    comps["scheduler"].save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionInpaintPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
         "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return out
