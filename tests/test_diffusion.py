"""InpaintingDiffusion: loading from a diffusers folder, fine-tuning modes, trained weights, resume."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from experiments.config import load_config
from experiments.runner.builders import load_finetuned
from experiments.stages.finetune import finetune_diffusion
from lightning_modules.diffusion_bank import build_inpainting_bank, variant_weights
from lightning_modules.tiny_base import TINY_DIR, build_tiny_components, save_components
from lightning_modules.diffusion import InpaintingDiffusion


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny (8, 16, 16) base written with save_pretrained, as a user's SD folder would be."""
    root = tmp_path_factory.mktemp("base")
    save_components(build_tiny_components(root / "tok", width="test", image_size=32), root / "tiny")
    return root / "tiny"


def _data(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 8:18, 10:20] = 1
    return images, masks


def _batch(model, bs=4):
    images, masks = _data()
    model.set_prompts(["a polyp", "normal mucosa"])
    bank = build_inpainting_bank(model, images, masks, 1, 2, n_background=1)
    i = torch.multinomial(variant_weights(bank, 0.3), bs, replacement=True)
    return dict(z0=bank["z0"][bank["img"][i]], mask_lat=bank["mask_lat"][i], masked_lat=bank["masked_lat"][i],
                prompt_idx=bank["prompt_idx"][i])


def _train(model, steps=3):
    opt = model.configure_optimizers()
    for _ in range(steps):
        loss = model.training_loss(_batch(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_from_base_loads_local_folder_and_generates(base_dir):
    model = InpaintingDiffusion.from_base(str(base_dir), finetune="none").eval()
    src = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 8:20] = 1
    out = model.inpaint(src, mask, ["a polyp"] * 2, ["normal"] * 2, guidance_scale=2.0, steps=3, progress=False,
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == src.shape and 0 <= out.min() and out.max() <= 1
    outside = (1 - mask).bool().expand_as(src)
    mse = ((out - src)[outside] ** 2).mean()
    assert mse == 0 or 10 * torch.log10(1 / mse) >= 40
    assert ((out - src)[mask.bool().expand_as(src)].abs().mean()) > 1e-3
    z = model.encode_images(src)
    assert z.shape == (2, 4, 8, 8) and model.decode_latents(z).shape == src.shape
    assert model.encode_prompts(["a", ""]).dim() == 3 and model.alphas_cumprod.shape == (model.num_train_timesteps,)


def test_missing_folder_and_subfolder_errors(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InpaintingDiffusion.from_base(str(tmp_path / "nope"))
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="vae"):
        InpaintingDiffusion.from_base(str(partial))
    (partial / "text_encoder_2").mkdir()  # an SDXL folder needs its second tokenizer too
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        InpaintingDiffusion.from_base(str(partial))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny SDXL-inpainting-shaped folder: two text encoders, a UNet with text_time conditioning."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    comps = build_tiny_components(root / "tok", width="test", image_size=32)
    tok, te1 = comps["tokenizer"], comps["text_encoder"]
    cfg2 = CLIPTextConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32, projection_dim=12)
    comps["text_encoder_2"], comps["tokenizer_2"] = CLIPTextModelWithProjection(cfg2), tok
    dims = te1.config.hidden_size + 12
    comps["unet"] = UNet2DConditionModel.from_config(dict(
        comps["unet"].config, cross_attention_dim=dims, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4))
    return save_components(comps, root / "sdxl")


def test_sdxl_folder_loads_generates_and_lora_roundtrips(sdxl_dir, tmp_path):
    model = InpaintingDiffusion.from_base(str(sdxl_dir), finetune="lora", lora_rank=2, lr=1e-2, train_text_encoder=True)
    assert model.is_sdxl
    emb = model.encode_prompts(["a polyp", ""])
    assert emb.shape == (2, model.tokenizer.model_max_length + 1, model.unet.config.cross_attention_dim)
    _train(model, steps=2)
    src, mask = torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 8:20] = 1
    model.eval()
    out = model.inpaint(src, mask, ["a polyp"] * 2, ["normal"] * 2, guidance_scale=3.0, steps=3, progress=False,
                        generator=torch.Generator().manual_seed(0))
    outside = (1 - mask).bool().expand_as(src)
    assert out.shape == src.shape and torch.allclose(out[outside], src[outside], atol=1e-2)
    path = model.save_trained(tmp_path / "trained.safetensors")
    from safetensors.torch import load_file
    assert any(k.startswith("text_encoder_2.") for k in load_file(str(path)))
    again = InpaintingDiffusion.from_base(str(sdxl_dir), finetune="lora", lora_rank=2, train_text_encoder=True)
    again.load_trained(path).eval()
    assert torch.allclose(again.encode_prompts(["a polyp", ""]), model.encode_prompts(["a polyp", ""]))


def test_lora_trains_adapters_only(base_dir):
    model = InpaintingDiffusion.from_base(str(base_dir), finetune="lora", lora_rank=2, lr=1e-2)
    before, vae_before = _snapshot(model.unet), _snapshot(model.vae)
    assert all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    _train(model)
    after = model.unet.state_dict()
    base_keys = [k for k in before if "lora" not in k]
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(vae_before[k], v) for k, v in model.vae.state_dict().items())


def test_full_finetune_changes_unet_not_vae_or_text(base_dir):
    model = InpaintingDiffusion.from_base(str(base_dir), finetune="full", lr=1e-3)
    unet0, vae0, text0 = _snapshot(model.unet), _snapshot(model.vae), _snapshot(model.text_encoder)
    _train(model, steps=2)
    assert any(not torch.equal(unet0[k], v) for k, v in model.unet.state_dict().items())
    assert all(torch.equal(vae0[k], v) for k, v in model.vae.state_dict().items())
    assert all(torch.equal(text0[k], v) for k, v in model.text_encoder.state_dict().items())


@pytest.mark.parametrize("mode,text", [("lora", False), ("lora", True), ("full", False)])
def test_save_load_trained_round_trip(base_dir, tmp_path, mode, text):
    kw = dict(finetune=mode, lora_rank=2, lr=1e-2, train_text_encoder=text)
    model = InpaintingDiffusion.from_base(str(base_dir), **kw)
    _train(model, steps=2)
    path = model.save_trained(tmp_path / "w.safetensors")
    fresh = InpaintingDiffusion.from_base(str(base_dir), **kw).load_trained(path)
    assert fresh.prompt_texts == model.prompt_texts
    b = _batch(model, 2)
    z_t, t = torch.randn_like(b["z0"]), torch.tensor([500, 10])
    args = (z_t, t, b["mask_lat"], b["masked_lat"])
    model.eval(), fresh.eval()
    with torch.no_grad():
        e1 = model.predict_eps(*args, model.encode_prompts(["a polyp"] * 2))
        e2 = fresh.predict_eps(*args, fresh.encode_prompts(["a polyp"] * 2))
    torch.testing.assert_close(e1, e2)
    if mode == "lora":  # adapters only: far smaller than the UNet
        assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.unet.parameters())
    with pytest.raises(ValueError, match="finetune"):
        InpaintingDiffusion.from_base(str(base_dir), finetune="full" if mode == "lora" else "lora").load_trained(path)


def _datamodule():
    images, masks = _data(n=4)
    return types.SimpleNamespace(setup=lambda stage=None: None, images=images, masks=masks, prompt="a polyp",
                                 modality="polyp", split_indices={"train_few": [0, 1, 2, 3]})


def test_finetune_stage_resumes_from_last_ckpt(base_dir, tmp_path, monkeypatch):
    over = [f"diffusion.base_model={base_dir}", "diffusion.batch_size=2", "diffusion.checkpoint_every=2",
            "diffusion.lora_rank=2", "trainer.log_every_n_steps=1"]
    cfg = load_config(None, over + ["diffusion.steps=4"])
    _, m1 = finetune_diffusion(cfg, _datamodule(), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert m1["ft/steps"] == 4 and last.is_file()
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 4 and all("lora" in k for k in ckpt["state_dict"])  # trained weights only
    cfg = load_config(None, over + ["diffusion.steps=6"])  # "interrupted" at 4: continue to 6
    calls, real = [], InpaintingDiffusion.training_step
    monkeypatch.setattr(InpaintingDiffusion, "training_step", lambda self, *a: calls.append(1) or real(self, *a))
    model, m2 = finetune_diffusion(cfg, _datamodule(), tmp_path)
    assert m2["ft/steps"] == 6 and len(calls) == 2 and np.isfinite(m2["ft/loss"])  # continued, not restarted
    assert torch.load(last, weights_only=False)["global_step"] == 6
    loaded = load_finetuned(cfg, tmp_path)
    assert loaded.lesion_prompt == "a polyp" and loaded.background_prompt == "colonoscopy image of normal colon mucosa"
    assert load_finetuned(cfg, tmp_path) is loaded  # sweeps reuse the loaded model across trials


@pytest.mark.skipif(not (TINY_DIR / "unet").is_dir(), reason="shipped tiny base not built yet (meddiffaug pretrain)")
def test_shipped_tiny_base_loads_and_is_small():
    weights = sum(f.stat().st_size for f in TINY_DIR.rglob("*.safetensors"))
    assert weights <= 20 * 2 ** 20 and (TINY_DIR / "MODEL_CARD.md").is_file()
    model = InpaintingDiffusion.from_base("tiny", finetune="lora")
    assert model.unet.config.in_channels == 9
    assert model.encode_images(torch.rand(1, 3, 64, 64)).shape == (1, 4, 16, 16)
