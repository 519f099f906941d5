"""The fine-tune's memory and speed options (``diffusion`` keys; docs/gpus.md, "Fitting a GPU") on the tiny base."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from experiments.runner.builders import load_finetuned
from experiments.config import ConfigError, load_config
from experiments.stages import finetune as finetune_stage
from experiments.stages.finetune import finetune_diffusion
from lightning_modules.diffusion import InpaintingDiffusion
from lightning_modules.diffusion_memory import prepare_finetune, set_attention
from lightning_modules.tiny_base import build_tiny_components, save_components


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    save_components(build_tiny_components(root / "tok", width="test", image_size=32), root / "tiny")
    return root / "tiny"


def _datamodule(n=4, size=32):
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 8:18, 10:20] = 1
    return types.SimpleNamespace(setup=lambda stage=None: None, images=rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
                                 masks=masks, prompt="a polyp", modality="polyp", split_indices={"train_few": list(range(n))})


def _cfg(base_dir, *extra, steps=2):
    return load_config(None, [f"diffusion.base_model={base_dir}", "diffusion.batch_size=2", "diffusion.checkpoint_every=1",
                              "diffusion.lora_rank=2", "trainer.log_every_n_steps=1", f"diffusion.steps={steps}", *extra])


OPTIONS = {
    "checkpointing": ["diffusion.gradient_checkpointing=true"],
    "checkpointing_text": ["diffusion.gradient_checkpointing=true", "diffusion.train_text_encoder=true"],
    "bf16_lora": ["diffusion.mixed_precision=bf16"],
    "bf16_full": ["diffusion.mixed_precision=bf16", "diffusion.finetune=full"],
    "grad_accum": ["diffusion.grad_accum=2"],
    "ema": ["diffusion.ema_decay=0.9"],
    "eager_attention": ["diffusion.attention=eager"],
    "fused_adamw": ["diffusion.optimizer=adamw_fused"],
    "offload": ["diffusion.offload_frozen=true"],
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_saves_and_resumes(base_dir, tmp_path, name):
    _, m1 = finetune_diffusion(_cfg(base_dir, *OPTIONS[name]), _datamodule(), tmp_path)
    assert m1["ft/steps"] == 2 and np.isfinite(m1["ft/loss"])
    cfg = _cfg(base_dir, *OPTIONS[name], steps=3)  # "interrupted" at 2: continue to 3
    model, m2 = finetune_diffusion(cfg, _datamodule(), tmp_path)
    assert m2["ft/steps"] == 3 and torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    loaded = load_finetuned(cfg, tmp_path)  # what generation uses
    for part in (model, loaded):  # both back in fp32 for generation
        assert all(p.dtype == torch.float32 for p in part.parameters())
    out = loaded.inpaint(torch.rand(1, 3, 32, 32), torch.ones(1, 1, 32, 32), ["a polyp"], steps=2)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_grad_accum_counts_optimizer_steps(base_dir, tmp_path, monkeypatch):
    calls, real = [], InpaintingDiffusion.training_step
    monkeypatch.setattr(InpaintingDiffusion, "training_step", lambda self, *a: calls.append(1) or real(self, *a))
    _, m = finetune_diffusion(_cfg(base_dir, "diffusion.grad_accum=2"), _datamodule(), tmp_path)
    assert m["ft/steps"] == 2 and len(calls) == 4  # two batches per optimizer step


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_mixed_precision_keeps_trained_weights_fp32(base_dir, finetune):
    model = InpaintingDiffusion.from_base(str(base_dir), finetune=finetune)
    _, overrides = prepare_finetune(model, mixed_precision="bf16")
    assert overrides["precision"] == "bf16-mixed"
    trained = model.trainable_parameters()
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.dtype == torch.bfloat16 for p in model.vae.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.text_encoder.parameters())
    frozen_unet = [p for p in model.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen_unet) and (finetune == "full") == (not frozen_unet)
    model.set_prompts(["a polyp", "normal mucosa"])
    batch = dict(z0=torch.randn(2, 4, 8, 8), mask_lat=torch.ones(2, 1, 8, 8), masked_lat=torch.randn(2, 4, 8, 8),
                 prompt_idx=torch.tensor([1, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_loss(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)


def test_ema_weights_are_saved_and_used_for_generation(base_dir, tmp_path):
    cfg = _cfg(base_dir, "diffusion.ema_decay=0.5", steps=3)
    finetune_diffusion(cfg, _datamodule(), tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    ema = next(v for k, v in ckpt["callbacks"].items() if "EMACallback" in k)
    loaded = load_finetuned(cfg, tmp_path)
    used = loaded.trainable_parameters()  # the LoRA weights generation runs with
    raw = list(ckpt["state_dict"].values())  # the last optimizer step's weights
    assert len(used) == len(ema["shadow_params"]) == len(raw)
    for p, s in zip(used, ema["shadow_params"]):
        torch.testing.assert_close(p.detach(), s)
    assert any(not torch.equal(r, s) for r, s in zip(raw, ema["shadow_params"]))  # EMA != last raw weights


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    model = InpaintingDiffusion.from_base(str(base_dir), finetune="lora")
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        prepare_finetune(model, optimizer="adamw8bit")


def test_sdpa_attention_is_checked(base_dir):
    model = InpaintingDiffusion.from_base(str(base_dir), finetune="lora")
    set_attention(model.unet, "sdpa")  # diffusers' default: passes
    from diffusers.models.attention_processor import AttnProcessor

    model.unet.set_attn_processor(AttnProcessor())
    with pytest.raises(RuntimeError, match="AttnProcessor2_0"):
        set_attention(model.unet, "sdpa")


def test_new_keys_at_defaults_keep_signatures():
    new = {"gradient_checkpointing", "mixed_precision", "grad_accum", "ema_decay", "attention", "optimizer", "offload_frozen"}
    cfg = load_config(None, [])
    assert not new & set(finetune_stage.inputs(cfg)["diffusion"])  # the signature is what it was
    memory_only = load_config(None, ["diffusion.gradient_checkpointing=true", "diffusion.offload_frozen=true"])
    assert finetune_stage.inputs(memory_only) == finetune_stage.inputs(cfg)
    assert finetune_stage.inputs(load_config(None, ["diffusion.mixed_precision=bf16"])) != finetune_stage.inputs(cfg)


@pytest.mark.parametrize("override, match", [
    ("diffusion.mixed_precision=fp8", "mixed_precision"), ("diffusion.grad_accum=0", "grad_accum"),
    ("diffusion.ema_decay=1.0", "ema_decay"), ("diffusion.optimizer=sgd", "optimizer"),
    ("diffusion.attention=flash", "attention")])
def test_bad_option_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
