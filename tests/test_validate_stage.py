"""run_validate end to end on a fake datamodule, a fake generate folder and the fake diffusion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.config import load_config
from experiments.stages.validate import run_validate
from experiments.stages.validate.erode import erode

from fakes import S, CoreOnlySegmenter, FakeDiffusion, OracleSegmenter


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_outputs(work, metrics, n=10):
    for key in ("gen/accept_rate", "gen/n_accepted", "gen/real_pass_rate", "gen/gate_flagged"):
        assert key in metrics
    decisions = _read(work / "decisions.jsonl")
    accepted = _read(work / "accepted.jsonl")
    assert len(decisions) == n and (work / "accept_reject.png").is_file()
    assert metrics["gen/n_accepted"] == len(accepted) == sum(d["accepted"] for d in decisions)
    for row in accepted:  # absolute image paths; masks: eroded copies, relative to workdir (renamed when done)
        assert row["image"].startswith("/") and row["mask"].startswith("masks/")
        assert Image.open(work / row["mask"]).size == (S, S)
    return {d["id"]: d for d in decisions}, accepted


def test_pixel_mode_with_oracle_segmenter(generated, tmp_path):
    dm, gen, kinds = generated
    cfg = load_config(None, ["validator.mode=pixel", "validator.iou_threshold=0.7", "validator.erode_px=1"])
    from lightning_modules.gating.quality import pixel_stat_features
    work = tmp_path / "validate"
    metrics = run_validate(cfg, dm, work, {"generate": gen}, segmenter=OracleSegmenter(), feature_fn=pixel_stat_features)
    dec, accepted = _check_outputs(work, metrics)
    verdict = {kind: [] for kind in kinds}
    for i, kind in enumerate(kinds):
        verdict[kind].append(dec[f"g{i}"]["accepted"])
    assert all(verdict["good"]) and not any(verdict["erased"]) and not any(verdict["shifted"])
    assert "outlier" in dec["g8"]["reasons"] and "near_copy" in dec["g9"]["reasons"]
    assert metrics["gen/real_pass_rate"] == 1.0 and metrics["gen/gate_flagged"] == 0.0
    # erosion: every accepted mask lost its boundary ring
    for row in accepted:
        original = np.asarray(Image.open(gen / "masks" / f"{row['id']}.png"))
        eroded = np.asarray(Image.open(work / row["mask"]))
        assert 0 < eroded.sum() < original.sum() and not (eroded & ~original.astype(bool)).any()


def test_calibrate_threshold_lowers_never_raises_and_checks_other_pairs():
    from lightning_modules.gating.sanity import calibrate_threshold
    real = torch.tensor([0.40, 0.90, 0.50, 0.90, 0.60, 0.90, 0.45, 0.90, 0.55, 0.10])
    ious = {"real": real, "misplaced": torch.zeros(10), "missing": torch.arange(10.0)}
    theta, check = calibrate_threshold(ious, 0.7, 0.8)
    # calibrated on the even pairs (0.40 .. 0.60): 80 % of them reach θ
    assert theta == pytest.approx(float(torch.quantile(real[0::2], 0.2)))
    assert float((real[0::2] >= theta).float().mean()) == pytest.approx(0.8)
    assert torch.equal(check["real"], real[1::2]) and torch.equal(check["missing"], torch.arange(1.0, 10.0, 2))
    assert calibrate_threshold(ious, 0.3, 0.8)[0] == 0.3  # a θ real pairs already reach stays
    assert calibrate_threshold(ious, 0.7, 0.8, floor=0.5)[0] == 0.5  # never below the floor
    zeros = {**ious, "real": torch.zeros(10)}  # a validator that misses every real lesion
    assert calibrate_threshold(zeros, 0.7, 0.8, floor=0.05)[0] == 0.05
    assert calibrate_threshold(ious, 0.7, None) == (0.7, ious)
    one = {k: v[:1] for k, v in ious.items()}
    with pytest.warns(UserWarning, match="at least 2 real validation pairs"):
        assert calibrate_threshold(one, 0.7, 0.8)[0] == 0.7


def test_calibrated_gate_passes_real_pairs_a_weak_gate_fails(generated, tmp_path):
    dm, gen, _ = generated
    from lightning_modules.gating.quality import pixel_stat_features
    base = ["validator.mode=pixel", "validator.iou_threshold=0.7", "validator.erode_px=0"]
    runs = {}
    for name, extra in (("fixed", []), ("calibrated", ["validator.calibrate_real_pass=0.8"])):
        work = tmp_path / name
        runs[name] = run_validate(load_config(None, base + extra), dm, work, {"generate": gen},
                                  segmenter=CoreOnlySegmenter(), feature_fn=pixel_stat_features)
        runs[name + "_decisions"] = _check_outputs(work, runs[name])[0]
    fixed, calibrated, dec = runs["fixed"], runs["calibrated"], runs["calibrated_decisions"]
    assert fixed["gen/gate_flagged"] == 1.0 and fixed["gen/iou_threshold"] == 0.7
    assert calibrated["gen/iou_threshold"] < 0.7 and calibrated["gen/gate_flagged"] == 0.0
    assert calibrated["gen/n_accepted"] > fixed["gen/n_accepted"]
    assert sum(dec[f"g{i}"]["accepted"] for i in range(4)) >= 3
    assert not any(dec[f"g{i}"]["accepted"] for i in range(4, 8))  # erased and shifted lesions still fail
    assert calibrated["gen/real_misplaced_reject_rate"] == 1.0


def test_gate_that_passes_wrong_real_pairs_is_flagged(generated, tmp_path):
    dm, gen, _ = generated
    cfg = load_config(None, ["validator.mode=pixel", "validator.iou_threshold=0.0", "validator.quality_filter=false"])
    with pytest.warns(UserWarning, match="rejects fewer than half"):
        metrics = run_validate(cfg, dm, tmp_path / "v", {"generate": gen}, segmenter=OracleSegmenter())
    assert metrics["gen/real_pass_rate"] == 1.0 and metrics["gen/real_misplaced_reject_rate"] == 0.0
    assert metrics["gen/gate_flagged"] == 1.0


def test_none_mode_accepts_all_but_quality_rejects(generated, tmp_path):
    dm, gen, _ = generated
    from lightning_modules.gating.quality import pixel_stat_features
    cfg = load_config(None, ["validator.mode=none"])
    metrics = run_validate(cfg, dm, tmp_path / "v", {"generate": gen}, feature_fn=pixel_stat_features)
    dec, _ = _check_outputs(tmp_path / "v", metrics)
    assert not dec["g8"]["accepted"] and not dec["g9"]["accepted"]
    assert all(dec[f"g{i}"]["accepted"] and dec[f"g{i}"]["iou"] is None for i in range(4))
    cfg = load_config(None, ["validator.mode=none", "validator.quality_filter=false"])
    ungated = run_validate(cfg, dm, tmp_path / "w", {"generate": gen})
    assert ungated["gen/accept_rate"] == 1.0 and "gen/iou_threshold" not in ungated  # no gate, no θ


def test_erode_shrinks_each_class():
    m = np.zeros((12, 12), np.uint8)
    m[2:10, 2:10], m[4:8, 4:8] = 1, 2
    e = erode(m, 1)
    assert e.sum() < m.sum() and (e[m == 0] == 0).all() and (e == 2).sum() == 4


@pytest.mark.slow
def test_single_step_mode_end_to_end(generated, tmp_path, monkeypatch):
    dm, gen, kinds = generated
    import importlib

    validate_gate = importlib.import_module("experiments.stages.validate.gate")  # the module, not its gate()
    from lightning_modules.gating.quality import pixel_stat_features
    overrides = ["validator.mode=single_step", "validator.train_steps=100", "validator.lr=4e-3",
                 "validator.t_eval=100", f"artifacts_dir={tmp_path}/artifacts"]
    cfg = load_config(None, overrides + ["validator.iou_threshold=0.5"])
    # loaded like the base model of a run without fine-tune, so the stage caches what it trains
    monkeypatch.setattr(validate_gate, "load_diffusion", lambda cfg, upstream: (FakeDiffusion(), "fake base"))
    work = tmp_path / "validate"
    metrics = run_validate(cfg, dm, work, {"generate": gen}, feature_fn=pixel_stat_features)
    dec, _ = _check_outputs(work, metrics)
    assert metrics["gen/real_pass_rate"] >= 0.75 and metrics["gen/gate_flagged"] == 0.0
    assert sum(dec[f"g{i}"]["accepted"] for i in range(4)) >= 3
    assert not any(dec[f"g{i}"]["accepted"] for i in range(4, 8))
    assert (work / "checkpoints" / "validator" / "last.ckpt").is_file()
    # a rerun reuses the cached validator (no retraining) and decides the same
    again = run_validate(cfg, dm, work, {"generate": gen}, feature_fn=pixel_stat_features)
    assert again["gen/n_accepted"] == metrics["gen/n_accepted"]
    # another θ re-filters with the cached validator: no retraining
    cached = sorted(p.name for p in (tmp_path / "artifacts" / "gate_models").iterdir())
    assert len(cached) == 2 and cached[0].startswith("base-") and cached[1].endswith(".real_ious.pt"), cached
    monkeypatch.setattr(validate_gate, "train_latent_validator", lambda *a, **k: pytest.fail("retrained"))
    strict = run_validate(load_config(None, overrides + ["validator.iou_threshold=0.9"]), dm, tmp_path / "validate_09",
                          {"generate": gen}, feature_fn=pixel_stat_features)
    assert strict["gen/real_pass_rate"] <= metrics["gen/real_pass_rate"]
    assert strict["gen/n_accepted"] <= metrics["gen/n_accepted"]
    assert strict["gen/real_missing_reject_rate"] >= metrics["gen/real_missing_reject_rate"]
