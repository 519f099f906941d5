"""Validators for few labels: pasted label-free training pairs and the fold validators' ensemble."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from experiments.config import load_config
from experiments.runner.gate_training import train_latent_validator, validator_settings
from lightning_modules.gating.ensemble import EnsembleValidator
from lightning_modules.gating.pasted_pairs import PastedPairs
from lightning_modules.gating.validator_bank import AugmentedPairs

from fakes import render, to_u8


def _pairs(copies: int = 1):
    images, masks = render(4, seed=1)
    return AugmentedPairs(to_u8(images), masks.numpy().astype(np.uint8), copies, seed=0)


def test_pasted_pairs_follow_the_real_ones_with_exact_masks():
    base = _pairs(copies=2)
    pool = to_u8(render(3, seed=2, lesion=False)[0])
    pairs = PastedPairs(base, pool, n_pasted=5, seed=0)
    assert len(pairs) == 8 + 5
    images, masks = pairs.get(0, len(pairs))
    real_images, real_masks = base.get(0, 8)
    assert torch.equal(images[:8], real_images) and torch.equal(masks[:8], real_masks)
    for k in range(8, 13):
        (row, label), source, _, _ = pairs.plans[k - 8]
        # the donor lesion, moved whole: same area, and the image changed only around the new mask
        assert int(masks[k].gt(0).sum()) == int((base.masks[row] > 0).sum())  # one component per fake image
        background = pool[source].astype(np.float32) / 255
        changed = np.abs(images[k].permute(1, 2, 0).numpy() - background).max(-1) > 1 / 255
        near = ndimage.binary_dilation(masks[k].numpy() > 0, iterations=6)
        assert changed.any() and not changed[~near].any()
        red = images[k][0] - images[k][1]  # the fake lesion is red: the pasted one is where its mask says
        assert float(red[masks[k] > 0].mean()) > float(red[masks[k] == 0].mean()) + 0.3
    again = PastedPairs(base, pool, n_pasted=5, seed=0).get(8, 13)
    assert torch.equal(again[0], images[8:]) and torch.equal(again[1], masks[8:])
    with pytest.raises(ValueError, match="n_normal"):
        PastedPairs(base, pool[:0], n_pasted=5)


def test_pasted_pairs_need_a_pool_and_enter_the_settings_only_when_used(tmp_path):
    cfg = load_config(None, ["validator.pasted_pairs=8"])
    with pytest.raises(ValueError, match="pasted_pairs=8 needs a normal pool"):
        train_latent_validator(cfg, None, np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8), "p", 2,
                               tmp_path)
    assert validator_settings(cfg, "p", 2)["pasted_pairs"] == 8
    assert "pasted_pairs" not in validator_settings(load_config(None, []), "p", 2)


class _Member:
    binary, prompted, device = True, True, torch.device("cpu")

    def __init__(self, logit: float):
        self.logit = logit

    def __call__(self, x, t, out_size, prompt=None):
        return torch.full((x.shape[0], 1, *out_size), self.logit)


def test_ensemble_thresholds_the_mean_probability():
    x = torch.zeros(2, 4, 4, 4)
    vote = EnsembleValidator([_Member(3.0), _Member(-1.0)]).predict_masks(x, 0, (8, 8))
    assert vote.shape == (2, 8, 8) and bool(vote.eq(1).all())  # mean of 0.95 and 0.27 > 0.5
    assert bool(EnsembleValidator([_Member(1.0), _Member(-3.0)]).predict_masks(x, 0, (8, 8)).eq(0).all())
    assert EnsembleValidator([_Member(0.0)]).prompted
