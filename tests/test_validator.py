"""Latent validator, gate functions, early rejection and the feature-space quality filter.

Everything runs on a fake diffusion object (avg-pool + fixed 1x1 conv "VAE", an ε-predictor that is
exact outside the inpainting mask and a shrinkage guess inside), so no real model is needed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.gating.quality import FeatureQualityFilter, ledoit_wolf, pixel_stat_features
from lightning_modules.gating.latent_gate import add_noise, estimate_z0, make_early_reject_callback, mask_iou
from lightning_modules.validator import LatentValidator

from fakes import S, FakeDiffusion, OracleLatentValidator, OracleSegmenter, render

def test_estimate_z0_recovers_z0_with_true_noise():
    ac = FakeDiffusion().alphas_cumprod
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 250, 999])
    z0_hat = estimate_z0(add_noise(z0, eps, ac, t), eps, ac, t)
    assert torch.allclose(z0_hat, z0, atol=1e-4)


def test_mask_iou_binary_multiclass_and_empty():
    a = torch.zeros(3, 4, 4, dtype=torch.long)
    b = a.clone()
    a[0, :2], b[0, :1] = 1, 1  # IoU 0.5
    a[1, :2] = 1  # target empty, prediction not -> 0
    assert torch.allclose(mask_iou(a, b), torch.tensor([0.5, 0.0, 1.0]))
    m = torch.tensor([[[0, 1, 2, 2]]])
    assert math.isclose(float(mask_iou(m, m, num_classes=3)), 1.0)


def test_early_reject_callback_stops_missing_and_misplaced():
    diff = FakeDiffusion()
    good, masks = render(1, seed=3)
    erased, _ = render(1, seed=3, lesion=False)
    shifted, _ = render(1, seed=3, shift=20)
    images = torch.cat([good, erased, shifted])
    masks = masks.repeat(3, 1, 1)
    z0, eps = diff.encode_images(images), torch.randn(3, 4, S // 4, S // 4)
    cb = make_early_reject_callback(OracleLatentValidator(diff), masks, 0.5, t_reject=200,
                                    alphas_cumprod=diff.alphas_cumprod)
    out = [cb(i, t, add_noise(z0, eps, diff.alphas_cumprod, torch.tensor([t])), eps) for i, t in enumerate([900, 500, 150, 100])]
    assert out[0] is None and out[1] is None and out[3] is None  # judged once, at the first t <= 200
    assert out[2].tolist() == [False, True, True]
    assert cb.ious[0] > 0.7


@pytest.fixture(scope="module")
def trained():  # ~20 s on one core: the tests using it are marked slow
    """A latent validator trained on 16 real pairs through the stage's own training path."""
    from experiments.config import load_config
    from experiments.runner.gate_training import train_latent_validator

    torch.set_num_threads(1)
    cfg = load_config(None, ["validator.train_steps=100", "validator.t_eval=100", "validator.lr=4e-3"])
    diff = FakeDiffusion()
    images, masks = render(16, seed=0)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        validator = train_latent_validator(cfg, diff, images, masks, "a polyp", 2, Path(d))
    return cfg, diff, validator


@pytest.mark.slow
def test_latent_validator_beats_chance_on_heldout_clean_latents(trained):
    _, diff, validator = trained
    assert validator.prompted  # the default gate is prompted with the intended mask
    images, masks = render(12, seed=100)
    latents = diff.encode_images(images)
    pred = validator.predict_masks(latents, 0, (S, S), prompt=masks)
    iou = mask_iou(pred, masks).mean()
    chance = mask_iou(torch.ones_like(masks), masks).mean()  # "everything is lesion"
    assert iou > 0.6 and iou > chance + 0.4, (float(iou), float(chance))
    # prompted with another image's mask, it must still segment the lesion that is there
    wrong = masks.roll(1, 0)
    pred_wrong = validator.predict_masks(latents, 0, (S, S), prompt=wrong)
    assert mask_iou(pred_wrong, masks).mean() > 0.5 > mask_iou(pred_wrong, wrong).mean()


@pytest.mark.slow
def test_single_step_gate_keeps_good_rejects_missing_and_misplaced(trained):
    from experiments.stages.validate.gate import make_gate
    from lightning_modules.gating.batching import gate_in_batches as run_gate

    cfg, diff, validator = trained
    good, masks = render(8, seed=200)
    erased, _ = render(8, seed=200, lesion=False)
    shifted, _ = render(8, seed=200, shift=S // 3)
    gate = make_gate("single_step", cfg, "a polyp", 2, torch.device("cpu"), diffusion=diff, validator=validator)
    iou_good, _ = run_gate(gate, good, masks)
    iou_erased, _ = run_gate(gate, erased, masks)
    iou_shift, _ = run_gate(gate, shifted, masks)
    theta = 0.5
    assert (iou_good >= theta).float().mean() >= 0.75, iou_good
    assert (iou_erased < theta).all(), iou_erased
    assert (iou_shift < theta).all(), iou_shift


def test_pixel_gate_logic_with_oracle_segmenter():
    from experiments.config import load_config
    from experiments.stages.validate.gate import make_gate
    from lightning_modules.gating.batching import gate_in_batches as run_gate

    cfg = load_config(None, ["validator.mode=pixel"])
    good, masks = render(4, seed=5)
    erased, _ = render(4, seed=5, lesion=False)
    shifted, _ = render(4, seed=5, shift=S // 3)
    gate = make_gate("pixel", cfg, "a polyp", 2, torch.device("cpu"), segmenter=OracleSegmenter())
    ious, _ = run_gate(gate, torch.cat([good, erased, shifted]), masks.repeat(3, 1, 1))
    assert (ious[:4] > 0.9).all() and (ious[4:] < 0.1).all()


def test_quality_filter_flags_noise_outlier_and_near_copy():
    real, masks = render(16, seed=0)
    qf = FeatureQualityFilter(pixel_stat_features, quality_quantile=0.95, near_copy_quantile=0.02).fit(real)
    fresh, fresh_masks = render(8, seed=300)  # same distribution, new lesion on another background
    noise = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    copy = real[3:4].clone()
    images = torch.cat([fresh, noise, copy])
    sources = torch.cat([real[:8], real[:1], real[3:4]])
    rep = qf.assess(images, sources, torch.cat([fresh_masks, masks[:1], masks[3:4]]))
    assert rep.outlier[8] and rep.score[8] > rep.threshold  # noise image
    assert rep.near_copy[9] and not rep.outlier[9]  # exact copy of its source
    assert rep.accepted[:8].float().mean() >= 0.75  # typical images mostly pass
    assert not rep.near_copy[:8].any()


def test_quality_filter_mahalanobis_and_shrinkage():
    x = torch.randn(30, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64)
    cov = ledoit_wolf(x)
    assert torch.allclose(cov, cov.T) and torch.linalg.eigvalsh(cov).min() > 0
    real, _ = render(16, seed=0)
    qf = FeatureQualityFilter(pixel_stat_features, metric="mahalanobis").fit(real)
    noise = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    assert qf.assess(noise).outlier.all()


def test_validator_checkpoint_roundtrip(tmp_path):
    ac = FakeDiffusion().alphas_cumprod
    v = LatentValidator(num_classes=3, alphas_cumprod=ac, width=8)
    x = torch.randn(2, 4, 8, 8)
    assert v(x, torch.tensor([0, 10]), (32, 32)).shape == (2, 3, 32, 32)
    assert v.predict_masks(torch.randn(1, 4, 7, 9), 5, (28, 36)).shape == (1, 28, 36)  # odd latent sizes
    torch.save({"state_dict": v.state_dict(), "hyper_parameters": dict(v.hparams)}, tmp_path / "v.pt")
    blob = torch.load(tmp_path / "v.pt", weights_only=True)
    w = LatentValidator(**blob["hyper_parameters"])
    w.load_state_dict(blob["state_dict"])
    assert torch.equal(w.alphas_cumprod, ac)
    assert np.allclose(w(x, 3).detach(), v(x, 3).detach())


def test_latent_path_matches_image_path_and_store_roundtrip(tmp_path):
    from datamodules import latent_store
    from lightning_modules.gating.latent_gate import (encode_condition, encode_prompt, single_step_estimate,
                                                          single_step_z0)

    diff = FakeDiffusion()
    images, masks = render(3, seed=7)
    z_img = single_step_estimate(diff, images, masks, "a polyp", 150, torch.Generator().manual_seed(1))
    z0, m_lat, mi_lat = encode_condition(diff, images, masks)
    rel = latent_store.save_shard(tmp_path, ["a", "b", "c"], z0, m_lat, mi_lat)
    rows = [{"id": "c", "latents": rel}, {"id": "a", "latents": rel}]
    cond = latent_store.load_latents(tmp_path, rows)
    assert torch.equal(cond["z0"], z0[[2, 0]]) and cond["mask_lat"].shape == (2, 1, S // 4, S // 4)
    assert latent_store.load_latents(tmp_path, rows + [{"id": "d"}]) is None  # one row without latents
    cond = latent_store.load_latents(tmp_path, [{"id": k, "latents": rel} for k in "abc"])
    z_lat = single_step_z0(diff, cond["z0"], cond["mask_lat"], cond["masked_lat"], encode_prompt(diff, "a polyp"),
                           150, torch.Generator().manual_seed(1))
    assert torch.allclose(z_lat, z_img)  # same noise, same condition: the lean path measures the same thing


def test_prompted_validator_needs_the_intended_mask(tmp_path):
    ac = FakeDiffusion().alphas_cumprod
    v = LatentValidator(alphas_cumprod=ac, width=8, prompted=True)
    x, prompt = torch.randn(2, 4, 8, 8), torch.zeros(2, 32, 32, dtype=torch.long)
    assert v.predict_masks(x, 5, (32, 32), prompt=prompt).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="prompt"):
        v.predict_masks(x, 5, (32, 32))
    torch.save({"state_dict": v.state_dict(), "hyper_parameters": dict(v.hparams)}, tmp_path / "v.pt")
    blob = torch.load(tmp_path / "v.pt", weights_only=True)
    w = LatentValidator(**blob["hyper_parameters"])
    w.load_state_dict(blob["state_dict"])
    assert w.prompted and torch.equal(w.predict_masks(x, 5, (32, 32), prompt=prompt), v.predict_masks(x, 5, (32, 32), prompt=prompt))


def test_real_negative_rejection_with_oracle_gate():
    from experiments.stages.validate.gate import make_gate
    from lightning_modules.gating.sanity import gate_sanity, real_gate_ious
    from lightning_modules.gating.validator_bank import erase_lesions

    images, masks = render(8, seed=3)
    erased = erase_lesions(images, masks)
    assert not OracleSegmenter().predict_masks(erased[0])[masks.bool()].any() and not erased[1].any()  # the lesion is gone
    gate = make_gate("pixel", None, "a polyp", 2, torch.device("cpu"), segmenter=OracleSegmenter())
    rates = gate_sanity(real_gate_ious(gate, images, masks), 0.5)
    assert rates["gen/real_pass_rate"] == 1.0
    assert rates["gen/real_misplaced_reject_rate"] == 1.0 and rates["gen/real_missing_reject_rate"] == 1.0


def test_augmented_copies_are_seeded_and_keep_masks_aligned():
    from lightning_modules.gating.validator_bank import augmented_copies

    images, masks = render(4, seed=5)
    a_img, a_msk = augmented_copies(images, masks, copies=3, seed=1)
    b_img, _ = augmented_copies(images, masks, copies=3, seed=1)
    assert a_img.shape == (12, 3, S, S) and a_msk.shape == (12, S, S) and torch.equal(a_img, b_img)
    assert torch.equal(a_msk[:4], masks)  # originals first
    # every transformed mask still covers the red lesion of its transformed image
    red = (a_img[:, 0] - a_img[:, 1]) > 0.5
    assert mask_iou(red.long(), a_msk).min() > 0.6
    assert augmented_copies(images, masks, copies=1)[0] is images


def test_operating_threshold_passes_the_share_asked_for_and_never_sits_on_a_tie():
    from benchmarks.validator import operating_threshold

    ties = torch.tensor([0.0] * 6 + [0.3, 0.5, 0.7, 0.9])  # most samples at IoU 0: a quantile would be 0
    theta = operating_threshold(ties, 0.5)
    assert 0.0 < theta < 0.3 and float((ties >= theta).float().mean()) == pytest.approx(0.4)
    spread = torch.linspace(0.05, 0.95, 20)
    assert float((spread >= operating_threshold(spread, 0.3)).float().mean()) == pytest.approx(0.3)
