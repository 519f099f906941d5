"""Sanity: the gate on real validation pairs (as they are, misplaced, missing), θ calibration, the flag."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch

from datamodules.io import atomic_write
from experiments.tracking import is_rank_zero
from lightning_modules.gating.sanity import (MIN_REAL_PASS, calibrate_threshold, gate_sanity, real_gate_ious,
                                             weak_rejects)


def sanity(cfg, gate: Callable, real_images: torch.Tensor, real_masks: torch.Tensor,
           cache: Optional[Path] = None) -> Tuple[float, dict]:
    """Check ``gate`` on the real validation pairs; calibrate θ when ``validator.calibrate_real_pass`` is set.

    Args:
        gate: the image-space gate. real_images: (N,3,S,S). real_masks: (N,S,S) int64.
        cache: file keeping the real pairs' IoUs (they depend on the gate, not on θ), or None.

    Returns:
        ``(θ applied, metrics)`` with ``gen/real_pass_rate``, ``gen/real_mean_iou``, the rejection
        rates of misplaced / missing real lesions and ``gen/gate_flagged``.
    """
    v, mode = cfg.validator, str(cfg.validator.mode)
    ious = torch.load(cache, weights_only=True) if cache is not None and cache.is_file() else None
    if ious is None:
        ious = real_gate_ious(gate, real_images, real_masks)
        if cache is not None and is_rank_zero():
            atomic_write(cache, lambda f: torch.save(ious, f))
    theta, check = calibrate_threshold(ious, float(v.iou_threshold), v.calibrate_real_pass, v.calibrate_min_threshold)
    metrics = gate_sanity(check, theta)
    metrics["gen/gate_flagged"] = flag(metrics, mode, theta, v.calibrate_real_pass is not None)
    return theta, metrics


def flag(metrics: dict, mode: str, theta: float, calibrated: bool) -> float:
    """1.0 (with a warning) when the gate fails real pairs or passes real pairs made wrong, else 0.0.

    A gate must pass real pairs AND reject them made wrong (a gate at θ = 0 passes the first check).
    """
    real_pass, weak = metrics["gen/real_pass_rate"], weak_rejects(metrics)
    if weak:
        warnings.warn(f"[validate] the {mode} gate at IoU >= {theta:.3g} rejects fewer than half of the real pairs "
                      f"made wrong ({', '.join(weak)} lesions): it passes wrong pairs (gen/gate_flagged=1).")
    if real_pass < MIN_REAL_PASS:
        warnings.warn(f"[validate] the {mode} gate passes only {real_pass:.0%} of REAL validation pairs at "
                      f"IoU >= {theta:.3g}: it judges its own weakness, not the samples (gen/gate_flagged=1)."
                      + ("" if calibrated else " validator.calibrate_real_pass=0.8 lowers θ to what real pairs reach."))
    return float(real_pass < MIN_REAL_PASS or bool(weak))
