"""Sanity: the gate on real validation pairs (as they are, misplaced, missing), θ calibration, the flag.

Lesion pairs only enter the rates, θ and the flag; lesion-free real pairs give the false-claim rate
(see :mod:`lightning_modules.gating.sanity`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from datamodules.io import atomic_write
from experiments.tracking import is_rank_zero
from lightning_modules.gating.crossfit import check_ious, crossfit_thresholds
from lightning_modules.gating.sanity import (LESION_KEYS, MIN_REAL_PASS, calibrate_threshold, false_claim_rate,
                                             gate_sanity, real_gate_ious, weak_rejects)


def _load_cache(cache: Optional[Path], need: set) -> Optional[dict]:
    """The cached real-pair figures, or None (no cache, or one without every ``need``ed entry: written
    before lesion-free pairs were kept apart, or without the normal pool)."""
    if cache is None or not cache.is_file():
        return None
    ious = torch.load(cache, weights_only=True)
    return ious if isinstance(ious, dict) and need <= set(ious) else None


def sanity(cfg, gate: Callable, real_images: torch.Tensor, real_masks: torch.Tensor,
           cache: Optional[Path] = None, pool_images: Optional[torch.Tensor] = None,
           crossfit: Optional[Callable[[], dict]] = None) -> Tuple[float, dict]:
    """Check ``gate`` on the real validation pairs; calibrate θ when ``validator.calibrate_real_pass`` is set.

    Args:
        gate: the image-space gate. real_images: (N,3,S,S). real_masks: (N,S,S) int64 (lesion-free
            pairs have empty masks: they are judged apart, never as passes).
        cache: file keeping the real pairs' IoUs (they depend on the gate, not on θ), or None.
        pool_images: the normal pool (``split_indices["normal"]``: lesion-free real images outside the
            label budget, never seen by the gate) (M,3,S,S), or None: judged claiming no lesion, like
            the lesion-free validation pairs, for ``gen/normal_pool_false_claim_rate``.
        crossfit: ``() -> lightning_modules.gating.crossfit.crossfit_ious output`` (``validator.crossfit_folds``),
            or None. Given, the real-pair figures are the cross-fitted ones over all labelled pairs (``real_images``
            are not scored), θ is what the calibration share of them reaches and each fold is checked at the θ
            of the other folds; otherwise the validation pairs are scored and split (even: θ, odd: the check).

    Returns:
        ``(θ applied, metrics)`` with ``gen/real_pass_rate``, ``gen/real_mean_iou``, the rejection
        rates of misplaced / missing real lesions and ``gen/gate_flagged`` (lesion pairs only),
        ``gen/real_normal_false_claim_rate`` (lesion-free pairs only) and the two pair counts; with a
        normal pool also ``gen/normal_pool_false_claim_rate`` and ``gen/n_normal_pool``.
    """
    v, mode = cfg.validator, str(cfg.validator.mode)
    pool = pool_images is not None and len(pool_images) > 0
    need = {*LESION_KEYS, "normal_claim"} | ({"pool_claim"} if pool else set()) | ({"fold"} if crossfit else set())
    ious = _load_cache(cache, need)
    if ious is None:
        ious = crossfit() if crossfit is not None else real_gate_ious(gate, real_images, real_masks)
        if pool:  # a validation pair's small share of lesion-free images: the pool is the larger sample
            empty = torch.zeros((len(pool_images), *real_masks.shape[1:]), dtype=real_masks.dtype)
            ious["pool_claim"] = real_gate_ious(gate, pool_images, empty)["normal_claim"]
        if cache is not None and is_rank_zero():
            atomic_write(cache, lambda f: torch.save(ious, f))
    if crossfit is not None:
        theta, per_pair = crossfit_thresholds(ious, float(v.iou_threshold), v.calibrate_real_pass,
                                              v.calibrate_min_threshold)
        metrics = gate_sanity(check_ious(ious), per_pair)
    else:
        theta, check = calibrate_threshold(ious, float(v.iou_threshold), v.calibrate_real_pass,
                                           v.calibrate_min_threshold)
        metrics = gate_sanity(check, theta)
    if pool:
        metrics.update({"gen/normal_pool_false_claim_rate": false_claim_rate(ious["pool_claim"]),
                        "gen/n_normal_pool": float(len(ious["pool_claim"]))})
    if not len(ious["real"]):
        where = "labelled pair" if crossfit is not None else "validation pair"
        warnings.warn(f"[validate] no real {where} holds a lesion: the {mode} gate's sanity check has "
                      f"nothing to judge (gen/real_pass_rate is NaN). Use a larger data.val_fraction.")
    metrics["gen/gate_flagged"] = flag(metrics, mode, theta, v.calibrate_real_pass is not None)
    return theta, metrics


def flag_reasons(metrics: dict, mode: str, theta: float, calibrated: bool) -> List[str]:
    """Why the gate is untrustworthy, one sentence each; empty when it is not.

    A gate must pass real pairs AND reject them made wrong (a gate at θ = 0 passes the first check).
    Lesion-free pairs play no part (their false-claim rate is reported on its own); NaN rates (no
    lesion pair) raise no flag.
    """
    reasons, real_pass, weak = [], metrics["gen/real_pass_rate"], weak_rejects(metrics)
    if weak:
        reasons.append(f"the {mode} gate at IoU >= {theta:.3g} rejects fewer than half of the real pairs "
                       f"made wrong ({', '.join(weak)} lesions): it passes wrong pairs (gen/gate_flagged=1).")
    if real_pass < MIN_REAL_PASS:
        reasons.append(f"the {mode} gate passes only {real_pass:.0%} of REAL validation lesion pairs at "
                       f"IoU >= {theta:.3g}: it judges its own weakness, not the samples (gen/gate_flagged=1)."
                       + ("" if calibrated else " validator.calibrate_real_pass=0.8 lowers θ to what real pairs reach."))
    return reasons


def flag(metrics: dict, mode: str, theta: float, calibrated: bool) -> float:
    """1.0 (with a warning per reason from :func:`flag_reasons`) when the gate is untrustworthy, else 0.0."""
    reasons = flag_reasons(metrics, mode, theta, calibrated)
    for reason in reasons:
        warnings.warn(f"[validate] {reason}")
    return float(bool(reasons))
