"""Peak memory of the pipeline's stages besides the fine-tune step, at Stable Diffusion size.

Each stage's largest unit of work, run through the project's own functions on fake tensors under
:class:`benchmarks.memory.LiveBytes` (the method of the fine-tune rows), with the sizes the stages use:

* ``gate_train``: one batch of the latent gate's training data (16 pairs: their VAE latents and inpainting
  conditions, :data:`~lightning_modules.gating.batching.ENCODE_BATCH` images per VAE call, and the
  ε̂ estimates) and one step of the latent validator on 16 items (masks at image size), the diffusion
  model resident. The bank goes to disk batch by batch: no term grows with the number of pairs.
* ``gate_score``: the validate stage's single-step gate on one batch of stored latents
  (:data:`~experiments.stages.validate.gate.LATENT_BATCH`, the UNet called on
  :data:`~lightning_modules.gating.batching.EPS_BATCH` at a time) with the validator at image size, and
  its sanity check's VAE encode of 16 real images.
* ``generate``: one batch of ``generation.batch_size`` inpaintings (classifier-free guidance doubles
  the UNet batch), two sampler steps, the VAE encode of the sources and the decode of the results.
* ``segment``: one training step of the default segmenter (``smp.Unet``, resnet18) at ``data.batch_size``.

The diffusion model is held in fp32 with its LoRA adapters, as the generate and validate stages load it.
"""
from __future__ import annotations

import torch

from benchmarks.memory_tracking import ModelledAdamW, build_model

PROMPT_LEN = 77


def _text(m) -> torch.Tensor:
    """(1,L,D) prompt embedding of the model's shape (no tokenizer in a benchmark model)."""
    dim = m.unet.config.cross_attention_dim
    return torch.randn(1, PROMPT_LEN + (1 if m.is_sdxl else 0), dim)


def diffusion_model(model: str, scale: int, device: str):
    """The fp32 LoRA model the generate and validate stages load."""
    return build_model(model, scale, device, "lora", False, "fp32").eval()


def gate_train(m, resolution: int, batch: int = 16, per_image: int = 3, optimizer=ModelledAdamW) -> None:
    """One batch of :func:`~lightning_modules.gating.validator_bank.build_validator_bank` and one validator step.

    The bank's donor search (:func:`~lightning_modules.gating.validator_bank.erase_lesions`) depends on the
    masks' values, which fake tensors do not have: its outputs are made as the same-shaped copies it returns.
    """
    from lightning_modules.gating.latent_gate import add_noise, encode_condition, estimate_z0
    from lightning_modules.gating.batching import in_chunks
    from lightning_modules.validator import LatentValidator

    images, masks = torch.rand(batch, 3, resolution, resolution), torch.zeros(batch, resolution, resolution, dtype=torch.long)
    img_mix, m_mix = images.clone(), masks.clone()
    text = _text(m).expand(batch, -1, -1)
    with torch.no_grad():
        z0, *c_true = in_chunks(lambda *a: encode_condition(m, *a), images, masks)
        c_other = in_chunks(lambda *a: encode_condition(m, *a), images, masks.roll(1, 0))[1:]
        z0_mix, *c_mix = in_chunks(lambda *a: encode_condition(m, *a), img_mix, masks)
        ac, items = m.alphas_cumprod, []
        variants = [(z0, [*c_true, text]), (z0, [*c_other, text]), (z0_mix, [*c_mix, text])]
        for j in range(per_image):
            zc, cond = variants[j % 3]
            tt = torch.full((batch,), 200, dtype=torch.long)
            z_t = add_noise(zc, torch.randn_like(zc), ac, tt)
            items.append(estimate_z0(z_t, in_chunks(m.predict_eps, z_t, tt, *cond), ac, tt))
    validator = LatentValidator(in_channels=z0.shape[1], prompted=True, flip=False,
                                alphas_cumprod=m.alphas_cumprod.detach().float())
    optimizer = optimizer([p for p in validator.parameters()])
    batch_items = {"x": items[0], "t": torch.full((batch,), 200), "z0": z0, "mask": m_mix.to(torch.uint8),
                   "prompt": masks.to(torch.uint8)}
    validator.log = lambda *a, **k: None  # no Trainer here to log to
    validator.training_step(batch_items, 0).backward()
    optimizer.step()


def gate_score(m, resolution: int, batch: int = 64, sanity_batch: int = 16, optimizer=None) -> None:
    """The single-step gate on ``batch`` stored latents, then the sanity check's encode of real images."""
    from experiments.stages.validate.gate import encode_latents
    from lightning_modules.gating.latent_gate import single_step_z0
    from lightning_modules.validator import LatentValidator

    h = resolution // 8
    validator = LatentValidator(in_channels=4, prompted=True).eval()
    masks = torch.zeros(batch, resolution, resolution, dtype=torch.long)
    with torch.no_grad():
        x = single_step_z0(m, torch.randn(batch, 4, h, h), torch.rand(batch, 1, h, h), torch.randn(batch, 4, h, h),
                           _text(m), 200)
        validator.predict_masks(x, 200, (resolution, resolution), prompt=masks)
        del x
        encode_latents(m, torch.rand(sanity_batch, 3, resolution, resolution),
                       torch.zeros(sanity_batch, resolution, resolution, dtype=torch.long), torch.device("cpu"),
                       batch_size=sanity_batch)


def generate(m, resolution: int, batch: int = 8, steps: int = 2, optimizer=None) -> None:
    """``m.inpaint`` of one generation batch: the guided sampler with classifier-free guidance."""
    from lightning_modules.synthesis import sampler

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    source, mask = torch.rand(batch, 3, resolution, resolution), torch.zeros(batch, 1, resolution, resolution)
    text = _text(m)
    m.encode_prompts = lambda prompts: text.expand(len(prompts), -1, -1)  # no tokenizer in a benchmark model
    # the sampler reads the scheduler's timesteps as ints, which fake tensors do not have: set them for real
    with unset_fake_temporarily():
        scheduler = sampler.make_scheduler(m.scheduler_config, "ddim")
        scheduler.set_timesteps(steps)
        scheduler.timesteps = [int(t) for t in scheduler.timesteps]
    scheduler.set_timesteps = lambda *a, **k: None
    make, sampler.make_scheduler = sampler.make_scheduler, lambda config, kind: scheduler
    try:
        with torch.no_grad():
            sampler.inpaint(m, source, mask, ["a polyp"] * batch, ["normal mucosa"] * batch, guidance_scale=7.5,
                            steps=steps, guiding_mask=False)
    finally:
        sampler.make_scheduler = make


def segmenter():
    """The segment stage's default segmenter (``cfg.segmenter`` defaults: ``smp.Unet``, resnet18; two classes)."""
    from types import SimpleNamespace

    from experiments.runner.builders import build_segmenter
    from experiments.config import load_config

    return build_segmenter(load_config(None, []), SimpleNamespace(num_classes=2, classes=("background", "lesion")),
                           total_steps=10)


def segment(model, resolution: int, batch: int = 8, optimizer=ModelledAdamW) -> None:
    """One training step of the segmenter: forward, loss, backward, AdamW."""
    optimizer = optimizer([p for p in model.parameters() if p.requires_grad])
    model.train()
    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    images, masks = torch.rand(batch, 3, resolution, resolution), torch.zeros(batch, resolution, resolution, dtype=torch.long)
    loss = model.training_step({"image": images, "mask": masks}, 0)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    loss.backward()
    optimizer.step()


STAGES = {"gate_train": gate_train, "gate_score": gate_score, "generate": generate, "segment": segment}
# SD size: the stages' own batch sizes (validate: 16 pairs per bank batch, LATENT_BATCH latents per ε̂ call;
# kvasir_seg_diffaug.yaml: generation.batch_size 8, data.batch_size 8)
ROWS = [dict(stage="gate_train", model="sd15", resolution=512, batch_size=16),
        dict(stage="gate_score", model="sd15", resolution=512, batch_size=64),
        dict(stage="generate", model="sd15", resolution=512, batch_size=8),
        dict(stage="segment", model="sd15", resolution=512, batch_size=8),
        dict(stage="gate_train", model="sdxl", resolution=1024, batch_size=16),
        dict(stage="gate_score", model="sdxl", resolution=1024, batch_size=64)]
# Validation on the width/5 model, for real on the CPU: smaller images and batches keep it to seconds
VALIDATION = {"gate_train": dict(resolution=256, batch_size=16), "gate_score": dict(resolution=256, batch_size=16),
              "generate": dict(resolution=256, batch_size=2), "segment": dict(resolution=128, batch_size=2)}


def _model(row: dict, scale: int, device: str):
    return segmenter() if row["stage"] == "segment" else diffusion_model(row["model"], scale, device)


def run_stage(model, row: dict, real: bool = False) -> None:
    """The stage's unit of work at ``row``'s resolution and batch size; ``real``: with PyTorch's AdamW, whose
    states are touched memory (the model of it allocates them empty, untouched on a CPU)."""
    optimizer = (lambda params: torch.optim.AdamW(params, foreach=True)) if real else ModelledAdamW
    STAGES[row["stage"]](model, row["resolution"], row["batch_size"], optimizer=optimizer)


def estimate_stage(row: dict, scale: int = 1) -> int:
    """Peak bytes of ``row`` on fake tensors: the model's weights and everything the work allocates."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.memory_tracking import LiveBytes, materialize_fake

    model = _model(row, scale, "meta")
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True), tracker:
        materialize_fake(model)
        tracker.track_module(model)
        run_stage(model, row)
    return tracker.max_peak


def measure_stage(row: dict, scale: int) -> int:
    """Peak resident bytes of ``row`` run for real on this CPU, above the process before the model was built."""
    import gc

    from benchmarks.memory_tracking import status_kib

    # load the kernels once on a small run, so the baseline includes them
    run_stage(_model(row, 10, "cpu"), dict(row, resolution=64, batch_size=1), real=True)
    gc.collect()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    torch.manual_seed(0)
    run_stage(_model(row, scale, "cpu"), row, real=True)
    return (status_kib("VmHWM") - base) * 1024
