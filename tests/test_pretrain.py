"""`meddiffaug pretrain` for MSDM's larger base: a wider UNet on the shipped tiny VAE."""
from __future__ import annotations

import pytest
import torch

from lightning_modules.tiny_base import TINY_DIR


@pytest.mark.slow
@pytest.mark.skipif(not (TINY_DIR / "vae").is_dir(), reason="shipped tiny base missing")
def test_pretrain_large_width_reuses_the_shipped_vae(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from experiments.pretrain import main

    out = tmp_path / "tiny_large"
    assert main(["--width", "large", "--vae-from", "tiny", "--unet-steps", "2", "--pool-size", "2",
                 "--batch-size", "2", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    shipped = UNet2DConditionModel.from_pretrained(TINY_DIR / "unet")
    assert tuple(unet.config.block_out_channels) == (64, 128, 128)
    assert sum(p.numel() for p in unet.parameters()) > 3 * sum(p.numel() for p in shipped.parameters())
    vae, shipped_vae = AutoencoderKL.from_pretrained(out / "vae"), AutoencoderKL.from_pretrained(TINY_DIR / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), shipped_vae.state_dict().values()))
    card = (out / "MODEL_CARD.md").read_text()
    assert "--width large" in card and "(64, 128, 128)" in card and "reused frozen from" in card
    assert "nan dB" not in card and f'from_base("{out}")' in card
    import json
    assert json.loads((out / "pretrain_metrics.json").read_text())["vae_psnr_db"] is None  # valid JSON, no NaN


def test_pretrain_rejects_a_folder_without_vae(tmp_path):
    from experiments.pretrain import main

    with pytest.raises(SystemExit, match="not a diffusers VAE folder"):
        main(["--vae-from", str(tmp_path), "--unet-steps", "1", "--pool-size", "2", "--out", str(tmp_path / "o"),
              "--work", str(tmp_path / "w")])


def test_pretraining_pool_and_bank_hold_no_lesion_label(monkeypatch, tmp_path):
    """The base never sees a lesion mask: the pool is images only, every region a random shape."""
    import numpy as np

    from experiments import pretrain
    from lightning_modules import diffusion_bank

    images, kinds, captions = pretrain.load_pool(2, 32, 0)
    assert images.shape == (8, 32, 32, 3) and kinds.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    lesion_words = {"polyp", "lesion", "mass", "cup", "disc", "tumor"}
    assert captions and not any(lesion_words & set(c.split()) for c in captions)

    seen = {}
    real_builder = diffusion_bank.build_inpainting_bank

    def spy(model, imgs, masks, *args, **kwargs):
        seen["masks"] = masks
        bank = real_builder(model, imgs, masks, *args, **kwargs)
        seen["kinds"] = bank["kind"]
        raise SystemExit("stop after the bank")

    monkeypatch.setattr(diffusion_bank, "build_inpainting_bank", spy)
    monkeypatch.setattr(pretrain, "load_pool", lambda n, s, seed: (images, kinds, captions))
    with pytest.raises(SystemExit, match="stop after the bank"):
        pretrain.main(["--vae-from", "tiny", "--unet-steps", "1", "--pool-size", "2", "--image-size", "32",
                       "--out", str(tmp_path / "never_written"), "--work", str(tmp_path / "work")])
    assert not seen["masks"].any(), "no lesion region may reach the bank"
    assert bool((seen["kinds"] == diffusion_bank.RANDOM).all())
    assert not (tmp_path / "never_written").exists()
