"""Cross-fitting the gate's sanity check over every labelled pair (validator.crossfit_folds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.config import ConfigError, load_config
from experiments.cache.signatures import subtree
from experiments.stages.validate import run_validate
from lightning_modules.gating.crossfit import crossfit_folds, crossfit_ious, crossfit_thresholds

from fakes import FakeDiffusion, OracleLatentValidator, OracleLogitValidator, RenderedDataModule


def _masks(n_lesion: int, n_free: int) -> torch.Tensor:
    masks = torch.zeros(n_lesion + n_free, 8, 8, dtype=torch.long)
    masks[:n_lesion, 2:5, 2:5] = 1
    return masks


def test_folds_partition_the_pairs_and_share_out_the_lesions():
    masks = _masks(7, 9)
    folds = crossfit_folds(masks, 4, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(16))
    assert [len(f) for f in folds] == [4, 4, 4, 4]
    assert sorted(int((f < 7).sum()) for f in folds) == [1, 2, 2, 2]  # the 7 lesion pairs dealt evenly
    assert [f.tolist() for f in crossfit_folds(masks, 4, seed=3)] == [f.tolist() for f in folds]
    with pytest.raises(ValueError, match="crossfit_folds"):
        crossfit_folds(masks, 17, seed=0)


def test_each_fold_is_judged_by_a_gate_fitted_without_it():
    masks = _masks(8, 0)
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 8, 8).clone()
    folds = crossfit_folds(masks, 4, seed=0)
    seen = []

    def fit_gate(train):
        seen.append(set(train.tolist()))

        def gate(imgs, msk):  # IoU = the gate's "fold id": which training set judged the pair
            return torch.full((len(msk),), float(len(seen))), msk
        return gate

    ious = crossfit_ious(fit_gate, images, masks, folds)
    for f, held in enumerate(folds):
        assert seen[f].isdisjoint(held.tolist()) and len(seen[f]) == 6
    assert ious["fold"].tolist() == [f for f, held in enumerate(folds) for _ in held]
    assert torch.equal(ious["real"], ious["fold"].float() + 1)


def test_calibrated_theta_of_a_fold_comes_from_the_other_folds():
    ious = {"real": torch.tensor([0.9, 0.8, 0.2, 0.3, 0.6, 0.7]), "fold": torch.tensor([0, 0, 1, 1, 2, 2])}
    theta, per_pair = crossfit_thresholds(ious, 0.7, real_pass=1.0, floor=0.05)
    assert theta == pytest.approx(0.2)  # every cross-fitted real IoU passes
    assert per_pair.tolist() == pytest.approx([0.2, 0.2, 0.6, 0.6, 0.2, 0.2])
    assert crossfit_thresholds(ious, 0.7, real_pass=None)[1].tolist() == pytest.approx([0.7] * 6)
    assert crossfit_thresholds(ious, 0.1, real_pass=1.0)[0] == pytest.approx(0.1)  # never raised


def test_crossfit_key_is_neutral_at_zero_and_rejects_bad_values():
    plain = load_config(None, ["validator.mode=single_step"])
    assert "crossfit_folds" not in subtree(plain, "validator")
    assert subtree(load_config(None, ["validator.crossfit_folds=4"]), "validator")["crossfit_folds"] == 4
    for bad in (["validator.crossfit_folds=1"], ["validator.crossfit_folds=4", "validator.mode=pixel"]):
        with pytest.raises(ConfigError, match="crossfit_folds"):
            load_config(None, bad)


def test_stage_reports_crossfitted_rates_over_every_labelled_lesion_pair(generated, tmp_path, monkeypatch):
    import experiments.stages.validate.crossfit as stage_crossfit

    _, gen, _ = generated
    dm, diffusion = RenderedDataModule(), FakeDiffusion()
    trained = []
    monkeypatch.setattr(stage_crossfit, "train_latent_validator",
                        lambda cfg, diff, images, masks, *a, **k: trained.append(len(masks)) or OracleLatentValidator(diff))
    base = ["validator.mode=single_step", "validator.quality_filter=false", "validator.t_eval=1",
            "validator.iou_threshold=0.5"]
    plain = run_validate(load_config(None, base), dm, tmp_path / "a", {"generate": gen},
                         diffusion=diffusion, validator=OracleLatentValidator(diffusion))
    fitted = run_validate(load_config(None, base + ["validator.crossfit_folds=4"]), dm, tmp_path / "b",
                          {"generate": gen}, diffusion=diffusion, validator=OracleLatentValidator(diffusion))
    assert plain["gen/n_real_lesion_pairs"] == 8 and fitted["gen/n_real_lesion_pairs"] == 24
    assert trained == [18, 18, 18, 18]  # 24 labelled pairs, each fold's validator on the other three folds
    assert fitted["gen/crossfit_folds"] == 4 and "gen/crossfit_folds" not in plain
    assert fitted["gen/real_pass_rate"] >= 0.9 and fitted["gen/real_misplaced_reject_rate"] >= 0.9
    assert fitted["gen/gate_flagged"] == 0.0
    assert fitted["gen/n_accepted"] == plain["gen/n_accepted"]  # the samples are judged by the run's validator


def test_fold_ensemble_judge_needs_folds_and_is_neutral_at_final():
    assert "judge" not in subtree(load_config(None, ["validator.crossfit_folds=4"]), "validator")
    on = ["validator.crossfit_folds=4", "validator.judge=fold_ensemble"]
    assert subtree(load_config(None, on), "validator")["judge"] == "fold_ensemble"
    with pytest.raises(ConfigError, match="crossfit_folds"):
        load_config(None, ["validator.judge=fold_ensemble"])
    with pytest.raises(ConfigError, match="early_reject_t"):
        load_config(None, on + ["validator.early_reject_t=400"])
    with pytest.raises(ConfigError, match="validator.judge"):
        load_config(None, ["validator.crossfit_folds=4", "validator.judge=average"])


def test_fold_ensemble_judges_the_samples_and_trains_no_final_validator(generated, tmp_path, monkeypatch):
    """validator.judge=fold_ensemble: the K fold validators are trained once (the check reads their
    scores, nothing is trained twice), their ensemble judges the samples, and the run's own validator
    is never trained."""
    import json

    import importlib

    import experiments.stages.validate.crossfit as stage_crossfit

    stage_gate = importlib.import_module("experiments.stages.validate.gate")  # the package exports a function `gate`
    _, gen, kinds = generated
    dm, diffusion = RenderedDataModule(), FakeDiffusion()
    trained = []
    monkeypatch.setattr(stage_crossfit, "train_latent_validator",
                        lambda cfg, diff, images, masks, *a, **k: trained.append(len(masks))
                        or OracleLogitValidator(diff, scale=1.0 + len(trained)))

    def never(*a, **k):
        raise AssertionError("the fold ensemble judges: the run's own validator must not be trained")

    monkeypatch.setattr(stage_gate, "train_latent_validator", never)
    base = ["validator.mode=single_step", "validator.quality_filter=false", "validator.t_eval=1",
            "validator.iou_threshold=0.5", "validator.crossfit_folds=4"]
    final = run_validate(load_config(None, base), dm, tmp_path / "a", {"generate": gen}, diffusion=diffusion,
                         validator=OracleLatentValidator(diffusion))
    trained.clear()
    ensemble = run_validate(load_config(None, base + ["validator.judge=fold_ensemble"]), dm, tmp_path / "b",
                            {"generate": gen}, diffusion=diffusion)
    assert trained == [18, 18, 18, 18]
    # members that agree on every mask: the ensemble decides as the oracle does, sample by sample
    for key in ("gen/n_accepted", "gen/real_pass_rate", "gen/real_misplaced_reject_rate"):
        assert ensemble[key] == pytest.approx(final[key]), key
    rows = [json.loads(line) for line in (tmp_path / "b" / "decisions.jsonl").read_text().splitlines()]
    judged = {r["id"]: r for r in rows}
    assert all(judged[f"g{i}"]["accepted"] for i, kind in enumerate(kinds) if kind == "good")
    assert not any(judged[f"g{i}"]["accepted"] for i, kind in enumerate(kinds) if kind in ("erased", "shifted"))
    assert all("validator ensemble of the 4 cross-fitted fold validators" in r["gate"] for r in rows)
