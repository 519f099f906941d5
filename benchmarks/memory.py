"""Peak memory of one diffusion fine-tune step at Stable Diffusion size, predicted without a GPU.

``python -m benchmarks.memory`` prints one JSON line per setting (SD-1.5 inpainting shape at
512 px: ``finetune`` lora | full × gradient checkpointing on/off × precision fp32 | bf16; full with
8-bit AdamW; SDXL inpainting shape LoRA at 1024 px).

Method: the project's own training step (``InpaintingDiffusion.training_loss`` with the options of
``lightning_modules.diffusion_memory``) runs on *fake* tensors (``FakeTensorMode``: shapes, dtypes
and devices, no data, no memory), under a ``TorchDispatchMode`` that counts the bytes of every live
tensor storage (a weakref finalizer per storage gives its release), rounded up to the CUDA caching
allocator's 512-byte blocks. The peak covers the weights, the gradients, the activations autograd
keeps, the backward pass and the optimizer step. AdamW's allocations are modelled exactly as
PyTorch's foreach AdamW (CUDA's default) makes them: two fp32 states per trained weight plus one
fp32 temporary of the trained size during the step (8-bit AdamW: two uint8 states plus block
scales, no temporary). Two steps run, so the second starts with the optimizer state in place.

Validation: the same settings on an SD-1.5 model with every width divided by ``--val-scale`` are
run for real on this CPU in a fresh process (``glibc`` returning every freed block to the OS), and
the peak resident memory the kernel reports for the process (``VmHWM`` after ``clear_refs``) minus
its resident memory before the model was built is the measurement. ``validated_error`` is
``|estimate - measured| / measured`` on that small model. Not counted: the CUDA context (about
0.3-1 GiB per process), cuDNN workspaces and allocator fragmentation; docs/gpus.md, "Fitting a GPU"
leaves headroom for them.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys

import torch

from benchmarks.memory_shapes import prompt_table_shape
from benchmarks.memory_tracking import GIB, LiveBytes, ModelledAdamW, build_model, materialize_fake, status_kib

def run_steps(m, precision: str, optimizer, latent: int, batch_size: int, steps: int = 2, tracker=None) -> int:
    """``steps`` fine-tune steps on cached latents/prompts, autocast as Lightning's ``bf16-mixed`` does.

    Returns:
        the peak bytes ``tracker`` saw during the forward and backward passes (0 without a tracker).
    """
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    frozen_dtype = half or torch.float32
    m._prompt_cache = torch.randn(prompt_table_shape(dict(text_encoder=m.text_encoder, text_encoder_2=m.text_encoder_2)
                                                     if m.is_sdxl else dict(text_encoder=m.text_encoder)),
                                  dtype=frozen_dtype)
    fwd_bwd = 0
    for _ in range(steps):
        if tracker is not None:
            tracker.peak = tracker.live  # the peak of this forward + backward only
        batch = dict(z0=torch.randn(batch_size, 4, latent, latent), mask_lat=torch.rand(batch_size, 1, latent, latent),
                     masked_lat=torch.randn(batch_size, 4, latent, latent),
                     prompt_idx=torch.ones(batch_size, dtype=torch.long))
        ctx = torch.autocast("cpu", dtype=half) if half is not None else contextlib.nullcontext()
        with ctx:
            loss = m.training_loss(batch)
        loss.backward()
        del loss, batch
        if tracker is not None:
            fwd_bwd = max(fwd_bwd, tracker.peak)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return fwd_bwd


def estimate(setting: dict, scale: int = 1) -> dict:
    """Peak bytes of one training step of ``setting`` on fake tensors (no memory allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = build_model(setting["model"], scale, "meta", setting["finetune"], setting["gradient_checkpointing"],
                    setting["precision"])
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True), tracker:
        materialize_fake(m)
        tracker.track_module(m)
        trained = m.trainable_parameters()
        frozen = sum(t.untyped_storage().nbytes() for n, t in m.named_parameters()
                     if not n.startswith("unet.") and not t.requires_grad)
        name = setting.get("optimizer", "adamw")
        opt = ModelledAdamW(trained, bits=8 if name == "adamw8bit" else 32, fused=name == "adamw_fused")
        fwd_bwd = run_steps(m, setting["precision"], opt, setting["resolution"] // 8, setting["batch_size"],
                            tracker=tracker)
    return dict(peak=tracker.max_peak, fwd_bwd=fwd_bwd, trainable=sum(p.numel() for p in trained), frozen=frozen,
                ema=4 * sum(p.numel() for p in trained))


def measure_real(setting: dict, scale: int) -> int:
    """Run ``setting`` for real on the CPU (this process) and return its peak resident bytes above baseline."""
    # load the kernels (oneDNN, autocast) once on a throwaway model, so the baseline includes them
    warm = build_model("sd15", 10, "cpu", setting["finetune"], setting["gradient_checkpointing"], setting["precision"])
    run_steps(warm, setting["precision"], torch.optim.AdamW(warm.trainable_parameters(), foreach=True), 8, 1, steps=1)
    del warm
    gc.collect()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    m = build_model(setting["model"], scale, "cpu", setting["finetune"], setting["gradient_checkpointing"],
                    setting["precision"])
    fused = setting.get("optimizer") == "adamw_fused"
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-4, weight_decay=1e-2, foreach=not fused, fused=fused or None)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run_steps(m, setting["precision"], opt, setting["resolution"] // 8, setting["batch_size"])
    return (status_kib("VmHWM") - base) * 1024


def validate(setting: dict, scale: int) -> dict:
    """Estimate and real measurement of ``setting`` on the width/``scale`` model (real run in a subprocess)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--measure", json.dumps(setting),
                           "--val-scale", str(scale)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"real measurement of {setting} failed:\n{proc.stderr[-2000:]}")
    measured = int(proc.stdout.strip().splitlines()[-1])
    est = estimate(setting, scale)["peak"]
    return dict(estimate=est, measured=measured, error=abs(est - measured) / measured)


SETTINGS = [dict(model="sd15", finetune=f, gradient_checkpointing=c, precision=p, resolution=512, batch_size=1)
            for f in ("lora", "full") for c in (False, True) for p in ("fp32", "bf16")]
SETTINGS += [dict(model="sd15", finetune="full", gradient_checkpointing=True, precision="bf16", resolution=512,
                  batch_size=1, optimizer=o) for o in ("adamw_fused", "adamw8bit")]
SETTINGS += [dict(model="sdxl", finetune="lora", gradient_checkpointing=c, precision="bf16", resolution=1024,
                  batch_size=1) for c in (False, True)]


def _validation_key(s: dict) -> tuple:
    # bitsandbytes needs CUDA: 8-bit AdamW rows reuse the validation of the same step with AdamW
    # (only the modelled optimizer state differs), and say so
    optimizer = s.get("optimizer", "adamw")
    return s["finetune"], s["gradient_checkpointing"], s["precision"], "adamw" if optimizer == "adamw8bit" else optimizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val-scale", type=int, default=5, help="width divisor of the validation model (5: 320->64)")
    parser.add_argument("--only", default=None, help="run only settings whose model is this (sd15 | sdxl)")
    parser.add_argument("--no-validate", action="store_true", help="skip the real CPU runs (estimates only)")
    parser.add_argument("--stage", default=None, help="only rows of this stage (finetune | gate_train | gate_score | "
                        "generate | segment)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one real run, in a subprocess
    parser.add_argument("--measure-stage", default=None, help=argparse.SUPPRESS)  # likewise, for a stage row
    args = parser.parse_args(argv)
    if args.measure:
        print(measure_real(json.loads(args.measure), args.val_scale))
        return
    if args.measure_stage:
        from benchmarks.memory_stages import measure_stage

        print(measure_stage(json.loads(args.measure_stage), args.val_scale))
        return
    if args.stage in (None, "finetune"):
        _finetune_rows(args)
    if args.stage != "finetune":
        _stage_rows(args)


def _finetune_rows(args) -> None:
    checks: dict = {}
    for s in SETTINGS:
        if args.only and s["model"] != args.only:
            continue
        est = estimate(s)
        key = _validation_key(s)
        if not args.no_validate and key not in checks:
            # the SDXL rows reuse the SD-1.5 validation of the same settings (same step, same method)
            checks[key] = validate(dict(s, model="sd15", resolution=512, optimizer=key[3]), args.val_scale)
        check = checks.get(key)
        print(json.dumps(dict(
            stage="finetune", model=f"{s['model']}-inpainting", finetune=s["finetune"], gradient_checkpointing=s["gradient_checkpointing"],
            precision=s["precision"] if s["precision"] == "fp32" else f"{s['precision']}-mixed",
            optimizer=s.get("optimizer", "adamw"), resolution=s["resolution"], batch_size=s["batch_size"],
            trainable_params=est["trainable"], peak_gib=round(est["peak"] / GIB, 2),
            fwd_bwd_peak_gib=round(est["fwd_bwd"] / GIB, 2),
            frozen_vae_text_gib=round(est["frozen"] / GIB, 2), ema_extra_gib=round(est["ema"] / GIB, 2),
            validated_error=round(check["error"], 3) if check else None,
            validation=dict(model=f"sd15-inpainting/{args.val_scale}", estimate_gib=round(check["estimate"] / GIB, 3),
                            measured_gib=round(check["measured"] / GIB, 3),
                            optimizer=key[3]) if check else None,
        )), flush=True)


def _real_run(flag: str, setting: dict, scale: int) -> int:
    """One real CPU measurement in a fresh process (``glibc`` returning every freed block to the OS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", flag, json.dumps(setting),
                           "--val-scale", str(scale)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"real measurement of {setting} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def _stage_rows(args) -> None:
    """The other stages' rows (:mod:`benchmarks.memory_stages`), each validated on the width/``val_scale`` model."""
    from benchmarks.memory_stages import ROWS, VALIDATION, estimate_stage

    checks: dict = {}
    for row in ROWS:
        if (args.only and row["model"] != args.only) or (args.stage and row["stage"] != args.stage):
            continue
        peak = estimate_stage(row)
        stage = row["stage"]
        if not args.no_validate and stage not in checks:
            # the SDXL rows reuse the SD-1.5 validation of the same stage (same code, same method)
            small = dict(row, model="sd15", **VALIDATION[stage])
            measured = _real_run("--measure-stage", small, args.val_scale)
            est = estimate_stage(small, args.val_scale)
            checks[stage] = dict(estimate=est, measured=measured, error=abs(est - measured) / measured, setting=small)
        check = checks.get(stage)
        scaled = "smp.Unet-resnet18" if stage == "segment" else f"sd15-inpainting/{args.val_scale}"
        print(json.dumps(dict(
            stage=stage, model="smp.Unet-resnet18" if stage == "segment" else f"{row['model']}-inpainting",
            precision="fp32", resolution=row["resolution"], batch_size=row["batch_size"],
            peak_gib=round(peak / GIB, 2), validated_error=round(check["error"], 3) if check else None,
            validation=dict(model=scaled, resolution=check["setting"]["resolution"],
                            batch_size=check["setting"]["batch_size"], estimate_gib=round(check["estimate"] / GIB, 3),
                            measured_gib=round(check["measured"] / GIB, 3)) if check else None,
        )), flush=True)


if __name__ == "__main__":
    main()
