"""The latent gate's cross-fitted sanity check (``validator.crossfit_folds`` = K >= 2).

The run's labelled pairs (``train_few`` and ``val``) are split into K folds
(:func:`lightning_modules.gating.crossfit.crossfit_folds`); for each fold a latent validator is trained
on the other folds' pairs exactly as the run's own validator is trained on ``train_few``, and the
fold's pairs are scored by that gate. The validator that judges the samples is the one trained on
``train_few`` (``validator.judge=final``), or the ensemble of the K fold validators
(``validator.judge=fold_ensemble``: together they saw every labelled pair). With K = 4 and 16 labelled
pairs each fold validator trains on 12 pairs, as many as the run's validator does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch

from datamodules.synthetic import to_tensor
from experiments.runner.gate_training import normal_pool, train_latent_validator
from experiments.stages.validate.gate import FULL_STEPS, device_of, make_gate
from lightning_modules.gating.crossfit import crossfit_folds, crossfit_ious
from lightning_modules.gating.ensemble import EnsembleValidator


def labelled_indices(datamodule) -> np.ndarray:
    """The run's labelled pairs: ``train_few`` then ``val`` (dataset indices)."""
    idx = datamodule.split_indices
    return np.asarray(list(idx["train_few"]) + list(idx["val"]), dtype=np.int64)


def crossfit_cache(cache, folds: int):
    """The cross-fitted scores' cache file next to the plain check's (another K, another file), or None."""
    return None if cache is None else Path(cache).with_name(
        Path(cache).name.replace(".real_ious.pt", f".crossfit{folds}.real_ious.pt"))


def crossfit_scorer(cfg, datamodule, workdir: Path, diffusion, prompt: str,
                    full_steps: int = FULL_STEPS) -> Callable[[], dict]:
    """``() -> crossfit_ious output`` for the run's labelled pairs under ``cfg.validator.mode``'s latent gate.

    Fold f's validator trains under ``workdir/crossfit/fold{f}`` (checkpoints there: a killed run resumes);
    the scorer keeps the fold validators it trained in its ``validators`` list (fold order), and its
    result: a second call returns the first call's scores without training again.

    Args:
        datamodule: set up; its uint8 ``images`` (N,S,S,3) and ``masks`` (N,S,S).
        diffusion: the model the run's latent gate uses for ε̂ (fine-tuned, or the base without fine-tune).
    """
    mode, k = str(cfg.validator.mode), int(cfg.validator.crossfit_folds)
    if mode not in ("single_step", "full"):
        raise ValueError(f"validator.crossfit_folds={k} applies to the latent gates (single_step, full), not "
                         f"validator.mode={mode}; set validator.crossfit_folds=0.")
    labelled = labelled_indices(datamodule)
    images = to_tensor(datamodule.images[labelled])
    masks = torch.from_numpy(datamodule.masks[labelled].astype(np.int64))
    folds = crossfit_folds(masks, k, int(cfg.generation.seed))
    ncls, device = int(datamodule.num_classes), device_of(cfg)

    def fit_gate(train: np.ndarray) -> Callable:
        fold = next(f for f, held in enumerate(folds) if not np.isin(held, train).any())
        print(f"[validate] cross-fitting the gate: fold {fold + 1}/{k}, validator on {len(train)} labelled pairs",
              flush=True)
        validator = train_latent_validator(cfg, diffusion, datamodule.images[labelled[train]],
                                           datamodule.masks[labelled[train]], prompt, ncls,
                                           Path(workdir) / "crossfit" / f"fold{fold}", pool=normal_pool(datamodule))
        validator = validator.to(device) if hasattr(validator, "to") else validator
        score.validators.append(validator)
        return make_gate(mode, cfg, prompt, ncls, device, diffusion, validator, full_steps=full_steps)

    def score() -> dict:
        if score.result is None:
            score.result = crossfit_ious(fit_gate, images, masks, folds)
        return score.result

    score.validators, score.result = [], None
    return score


def fold_ensemble(cfg, datamodule, workdir: Path, diffusion, prompt: str,
                  full_steps: int = FULL_STEPS) -> Tuple[EnsembleValidator, Callable[[], dict]]:
    """``validator.judge=fold_ensemble``: the cross-fitted fold validators, trained now, as one judge.

    Returns:
        ``(the ensemble (mean lesion probability of the K fold validators), the crossfit scorer)``;
        the scorer has already run, so the sanity check reads its scores without training again.
        θ is calibrated on those scores (each fold validator on pairs it never saw) and applied to the
        ensemble, as ``benchmarks.gate_trust`` measures it (gate ``<gate>+ensemble``).
    """
    scorer = crossfit_scorer(cfg, datamodule, workdir, diffusion, prompt, full_steps)
    scorer()
    return EnsembleValidator(scorer.validators), scorer
