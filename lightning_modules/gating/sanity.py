"""The gate's sanity check on real pairs: does it pass real lesions and reject real pairs made wrong?

A gate that passes few real validation pairs judges its own weakness, not the samples; one that
passes pairs whose lesion is misplaced or missing passes wrong samples too. Both are flagged.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from lightning_modules.gating.batching import gate_in_batches
from lightning_modules.gating.validator_bank import erase_lesions

# A gate is flagged (``gen/gate_flagged``, table warnings) below these rates.
MIN_REAL_PASS = 0.8  # share of real validation pairs the gate must pass at θ
MIN_WRONG_REJECT = 0.5  # share of misplaced / missing real lesions the gate must reject at θ


def real_gate_ious(gate: Callable, images: torch.Tensor, masks: torch.Tensor) -> dict:
    """The gate's IoUs on real validation pairs as they are and made wrong (for the sanity check).

    * ``real``: each image with its own mask (a good gate passes these);
    * ``misplaced``: each image claims its own mask moved by half the image size (the lesion is elsewhere);
    * ``missing``: each image has its lesion erased (:func:`erase_lesions`) but claims its mask.

    Args:
        gate: ``gate(images (B,3,H,W), masks (B,H,W)) -> (iou (B,), pred (B,H,W))``.
        images: (N,3,H,W) in [0,1]. masks: (N,H,W) int64.

    Returns:
        ``{"real", "misplaced", "missing"}`` -> IoU (N,) CPU tensors (empty without pairs).
    """
    if len(images) == 0:
        return {k: torch.zeros(0) for k in ("real", "misplaced", "missing")}
    h, w = masks.shape[-2:]
    return {"real": gate_in_batches(gate, images, masks)[0],
            "misplaced": gate_in_batches(gate, images, masks.roll((h // 2, w // 2), (-2, -1)))[0],
            "missing": gate_in_batches(gate, erase_lesions(images, masks)[0], masks)[0]}


def calibrate_threshold(ious: dict, threshold: float, real_pass: Optional[float], floor: float = 0.0):
    """θ lowered to what ``real_pass`` of held-out real pairs reach; the sanity check uses other pairs.

    The even-indexed real validation pairs calibrate θ and the odd-indexed ones check the gate, so
    the reported real pass rate is not the calibration target read back. θ is never raised: a strong
    validator keeps the configured θ. Nor does it drop below ``floor``: a weak validator misses some
    real lesions entirely (IoU 0), and θ = 0 would pass pairs with no overlap at all.

    Args:
        ious: :func:`real_gate_ious` output, each (N,).
        threshold: the configured θ.
        real_pass: target share of real pairs to pass, or None (no calibration).
        floor: the lowest calibrated θ.

    Returns:
        ``(θ_effective, ious for the sanity check)``.
    """
    calib = ious["real"][0::2]
    calib = calib[~torch.isnan(calib)]
    if real_pass is None:
        return float(threshold), ious
    if len(calib) == 0 or len(ious["real"]) < 2:
        warnings.warn(f"[validate] validator.calibrate_real_pass needs at least 2 real validation pairs with a "
                      f"lesion; {len(ious['real'])} given, so θ stays {threshold}. Use a larger data.val_fraction.")
        return float(threshold), ious
    reached = float(torch.quantile(calib.float(), 1.0 - float(real_pass)))
    return min(float(threshold), max(float(floor), reached)), {k: v[1::2] for k, v in ious.items()}


def gate_sanity(ious: dict, threshold: float) -> dict:
    """``gen/real_pass_rate``, ``gen/real_mean_iou`` and the rejection rates of misplaced / missing real pairs."""
    def rate(x: torch.Tensor) -> float:
        return float(x.float().mean()) if len(x) else float("nan")

    return {"gen/real_pass_rate": rate(ious["real"] >= threshold), "gen/real_mean_iou": rate(ious["real"]),
            "gen/real_misplaced_reject_rate": rate(ious["misplaced"] < threshold),
            "gen/real_missing_reject_rate": rate(ious["missing"] < threshold)}


def weak_rejects(metrics: dict) -> list:
    """Which kinds of wrong real pairs (``misplaced``, ``missing``) the gate rejects too rarely."""
    return [k.split("_")[1] for k in ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")
            if metrics.get(k, 1.0) < MIN_WRONG_REJECT]
