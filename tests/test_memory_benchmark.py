"""benchmarks.memory: the live-bytes tracker and the fake-tensor estimate, on a tiny SD-shaped model."""
from __future__ import annotations

import gc

import torch

from benchmarks.memory import estimate, run_steps
from benchmarks.memory_tracking import BLOCK, LiveBytes, build_model

TINY = dict(model="sd15", resolution=64, batch_size=1)  # widths / 10, 8x8 latents


def test_live_bytes_counts_storages_once_and_releases_them():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes -> 4096 after the allocator's rounding
        view = a.view(10, 100)  # same storage: not counted again
        b = torch.empty(2, 8)
        assert tracker.live == 4096 + BLOCK
        del a, view
        gc.collect()
        assert tracker.live == BLOCK and tracker.max_peak == 4096 + BLOCK
        del b


def test_estimate_on_tiny_model_orders_settings():
    peaks = {(f, c): estimate(dict(TINY, finetune=f, gradient_checkpointing=c, precision="fp32"), scale=10)
             for f, c in (("lora", False), ("lora", True), ("full", False))}
    assert peaks[("lora", True)]["fwd_bwd"] < peaks[("lora", False)]["fwd_bwd"]  # checkpointing saves activations
    assert peaks[("lora", False)]["peak"] < peaks[("full", False)]["peak"]
    full = peaks[("full", False)]
    # at least weights, gradients and the two AdamW states of every trained weight
    assert full["peak"] >= 16 * full["trainable"] and full["trainable"] > 10 * peaks[("lora", False)]["trainable"]
    bf16 = estimate(dict(TINY, finetune="lora", gradient_checkpointing=False, precision="bf16"), scale=10)
    assert bf16["peak"] < peaks[("lora", False)]["peak"]  # frozen weights in half


def test_fake_estimate_matches_the_same_step_on_real_tensors():
    finetune = "full"  # weights, gradients, optimizer states and checkpointed activations all count
    setting = dict(TINY, finetune=finetune, gradient_checkpointing=True, precision="fp32")
    est = estimate(setting, scale=10)["peak"]
    torch.manual_seed(0)
    m = build_model("sd15", 10, "cpu", finetune, True, "fp32")
    tracker = LiveBytes()
    with tracker:
        tracker.track_module(m)
        opt = torch.optim.AdamW(m.trainable_parameters(), foreach=True)  # the real optimizer, not the model of it
        run_steps(m, "fp32", opt, 8, 1)
    assert abs(est - tracker.max_peak) / tracker.max_peak < 0.05


def test_stage_estimates_match_the_same_work_on_real_tensors():
    from benchmarks.memory_stages import _model, estimate_stage, run_stage

    for stage in ("gate_train", "gate_score", "generate", "segment"):
        row = dict(stage=stage, model="sd15", resolution=64, batch_size=2)
        est = estimate_stage(row, scale=10)
        torch.manual_seed(0)
        model = _model(row, 10, "cpu")
        tracker = LiveBytes()
        with tracker:
            tracker.track_module(model)
            run_stage(model, row)
        assert abs(est - tracker.max_peak) / tracker.max_peak < 0.05, stage
