"""The feature validator (validator.features=unet_decoder): decoder features, training, the gate, saving, config rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.config import ConfigError, load_config
from experiments.runner.gate_training import (load_validator, save_validator, train_latent_validator,
                                              validator_settings)
from experiments.stages.validate.gate import make_gate
from lightning_modules.gating.ensemble import EnsembleValidator
from lightning_modules.gating.unet_features import unet_features

from fakes import FakeDiffusion

S = 64  # the shipped tiny base's size


@pytest.fixture(scope="module")
def tiny():
    from lightning_modules.diffusion import InpaintingDiffusion
    return InpaintingDiffusion.from_base("tiny").eval()


def _pairs(n: int, seed: int = 0):
    from datamodules.procedural import render_procedural
    images, masks, _ = render_procedural("polyp", n, S, seed, normal_fraction=0.0)
    return images, masks


def test_features_come_from_one_unet_call_per_sample(tiny):
    calls = []
    tiny.unet.register_forward_hook(lambda *_: calls.append(1))
    z0 = torch.randn(3, 4, S // 4, S // 4)
    feats = unet_features(tiny, z0, torch.ones(3, 1, S // 4, S // 4), z0, tiny.encode_prompts(["a polyp"]), 50,
                          torch.Generator().manual_seed(0))
    assert feats.shape[0] == 3 and feats.shape[-2:] == z0.shape[-2:] and len(calls) == 1
    assert feats.shape[1] > z0.shape[1] + 1 and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="up_blocks"):
        unet_features(FakeDiffusion(), z0, z0[:, :1], z0, torch.zeros(1, 1, 1), 50)


def test_trained_feature_validator_gates_saves_and_reloads(tiny, tmp_path):
    cfg = load_config(None, ["validator.features=unet_decoder", "validator.t_eval=50", "validator.train_steps=4",
                             "validator.augment_copies=1", "tracking.enabled=false"])
    images, masks = _pairs(4)
    validator = train_latent_validator(cfg, tiny, images, masks, "a polyp", 2, tmp_path)
    assert validator.uses_unet_features and not list(tmp_path.glob("validator_bank_*"))  # training data removed
    gate = make_gate("single_step", cfg, "a polyp", 2, torch.device("cpu"), tiny, validator)
    real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ious, preds = gate(real, torch.from_numpy(masks.astype(np.int64)))
    assert ious.shape == (4,) and preds.shape == (4, S, S) and ((ious >= 0) & (ious <= 1)).all()
    settings = validator_settings(cfg, "a polyp", 2)
    assert settings["features"] == "unet_decoder"
    again = load_validator(save_validator(tmp_path / "v.pt", validator, settings), settings)
    feats = torch.randn(2, validator.hparams.in_channels, S // 4, S // 4)
    assert torch.equal(again.predict_from_features(feats, (S, S)), validator.predict_from_features(feats, (S, S)))
    pair = EnsembleValidator([validator, again])
    assert pair.uses_unet_features and torch.equal(pair.predict_from_features(feats, (S, S)),
                                                   validator.predict_from_features(feats, (S, S)))
    with pytest.raises(ValueError, match="single_step"):
        make_gate("full", cfg, "a polyp", 2, torch.device("cpu"), tiny, validator)


@pytest.mark.parametrize("clash", ["validator.mode=full", "validator.early_reject_t=400", "validator.pasted_pairs=4"])
def test_feature_validator_refuses_what_it_cannot_read(clash):
    with pytest.raises(ConfigError, match=clash.split("=")[0]):
        load_config(None, ["validator.features=unet_decoder", clash])
    with pytest.raises(ConfigError, match="validator.features"):
        load_config(None, ["validator.features=pixels"])


def test_tables_name_the_feature_validator_not_diffaugs_plain_one():
    import pandas as pd

    from experiments.reporting.aggregate import validator_of

    def runs(features, prompted_metric):
        return pd.DataFrame({"params.validator.mode": ["single_step"] * 2, "params.augment.method": ["diffusion"] * 2,
                             "params.validator.features": features, "metrics.gen/validator_prompted": prompted_metric})

    assert validator_of(runs(["unet_decoder"] * 2, [None, None])) == "features"
    assert validator_of(runs(["unet_decoder", "latent"], [None, 0.0])) == "mixed"
    assert validator_of(runs(["latent"] * 2, [0.0, 0.0])) == "plain"
