"""Build the tiny latent-diffusion inpainting components from config (no download, ever).

The shipped base (``lightning_modules/bases/tiny``) is these components after
``meddiffaug pretrain``; tests build even smaller ones with ``width="test"``.
All components are stock diffusers / transformers classes, so the same loading code
(:func:`load_components`) serves the tiny base and a user's SD inpainting folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from lightning_modules.tokenizer import build_tiny_tokenizer, legacy_special_tokens

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
TINY_DIR = Path(__file__).resolve().parent / "bases" / "tiny"

_WIDTHS: Dict[str, dict] = {
    # (32, 64, 64) is about right on CPU (prototype lesson): spend budget on steps, not width.
    "default": dict(vae=(32, 64, 64), unet=(32, 64, 64), text_hidden=64, groups=8, head_dim=8),
    "test": dict(vae=(8, 16, 16), unet=(8, 16, 16), text_hidden=16, groups=4, head_dim=4),
    # MSDM's comparison: the same VAE (so `pretrain --vae-from tiny` can reuse it) and a UNet with
    # twice the channels (about 4x the parameters)
    "large": dict(vae=(32, 64, 64), unet=(64, 128, 128), text_hidden=64, groups=8, head_dim=8),
}


def tiny_configs(width: str = "default", image_size: int = 64) -> dict:
    """Constructor kwargs of the tiny VAE, UNet, text encoder and scheduler.

    The VAE downsamples 4x (64 px -> 16x16x4 latents); the UNet takes 9 channels
    ``[noisy latents 4, mask 1, masked-image latents 4]`` and predicts ε (4 channels).
    """
    if width not in _WIDTHS:
        raise ValueError(f"unknown tiny width {width!r}: choose from {', '.join(_WIDTHS)}")
    w = _WIDTHS[width]
    nv = len(w["vae"])
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=w["vae"],
        down_block_types=("DownEncoderBlock2D",) * nv, up_block_types=("UpDecoderBlock2D",) * nv,
        layers_per_block=1, norm_num_groups=w["groups"], sample_size=image_size, scaling_factor=1.0,
    )
    unet = dict(
        sample_size=image_size // 2 ** (nv - 1), in_channels=9, out_channels=4, block_out_channels=w["unet"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=w["groups"], cross_attention_dim=w["text_hidden"],
        attention_head_dim=w["head_dim"],
    )
    text = dict(
        hidden_size=w["text_hidden"], intermediate_size=2 * w["text_hidden"], num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, projection_dim=w["text_hidden"],
    )
    scheduler = dict(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    return dict(vae=vae, unet=unet, text=text, scheduler=scheduler)


def build_tiny_components(tokenizer_dir: str | Path, width: str = "default", image_size: int = 64, seed: int = 0) -> dict:
    """Instantiate randomly initialised tiny components.

    Args:
        tokenizer_dir: folder the generated vocabulary is written to (kept by the tokenizer).
        width: ``"default"`` (shipped base), ``"large"`` (wider UNet, MSDM's comparison) or ``"test"``.
        image_size: square pixel size S the VAE is built for.
        seed: initialisation seed.

    Returns:
        dict with keys ``unet, vae, text_encoder, tokenizer, scheduler``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tiny_configs(width, image_size)
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer(tokenizer_dir)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **cfg["text"],
    )
    return dict(
        unet=UNet2DConditionModel(**cfg["unet"]),
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=CLIPTextModel(text_cfg),
        tokenizer=tokenizer,
        scheduler=DDPMScheduler(**cfg["scheduler"]),
    )


def save_components(components: dict, out_dir: str | Path) -> Path:
    """Write components as a diffusers-format folder (safetensors weights); SDXL's second encoder too."""
    out = Path(out_dir)
    for name in SUBFOLDERS + SDXL_SUBFOLDERS:
        obj = components.get(name)
        if obj is None:
            continue
        if name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            obj.save_pretrained(out / name, safe_serialization=True)
        else:
            obj.save_pretrained(out / name)
    return out


def resolve_base(base_model: str | Path) -> Path:
    """Map ``"tiny"`` to the shipped folder and check a diffusers-format folder is complete.

    Raises:
        FileNotFoundError: the folder or one of its subfolders is missing (named in the message).
    """
    path = TINY_DIR if str(base_model) == "tiny" else Path(base_model).expanduser()
    if not path.is_dir():
        hint = " Run `meddiffaug pretrain` to rebuild the shipped tiny base." if str(base_model) == "tiny" else ""
        raise FileNotFoundError(f"Diffusion base folder '{path}' does not exist; pass 'tiny' or a local diffusers-format inpainting folder.{hint}")
    needed = list(SUBFOLDERS)
    if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():  # SDXL: both or neither
        needed += list(SDXL_SUBFOLDERS)
    missing = [s for s in needed if not (path / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"Diffusion base folder '{path}' lacks subfolder(s) {', '.join(missing)}; "
                                f"a diffusers-format inpainting folder needs {', '.join(needed)}.")
    return path


def load_components(base_model: str | Path) -> Tuple[dict, Path]:
    """Load ``unet, vae, text_encoder, tokenizer, scheduler`` (and SDXL's ``text_encoder_2,
    tokenizer_2``) from a local diffusers folder.

    Returns:
        (components dict, resolved folder path).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_base(base_model)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    if unet.config.in_channels != 9:
        raise ValueError(f"'{path}/unet' has in_channels={unet.config.in_channels}; an inpainting UNet needs 9 "
                         "([noisy latents 4, mask 1, masked-image latents 4]). Use an *inpainting* checkpoint.")
    comps = dict(
        unet=unet,
        vae=AutoencoderKL.from_pretrained(path / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True,
                                                **legacy_special_tokens(path / "tokenizer")),
        scheduler=DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True),
    )
    if (path / "text_encoder_2").is_dir():
        comps["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True)
        comps["tokenizer_2"] = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True,
                                                             **legacy_special_tokens(path / "tokenizer_2"))
    return comps, path
