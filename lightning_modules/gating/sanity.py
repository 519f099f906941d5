"""The gate's sanity check on real pairs: does it pass real lesions and reject real pairs made wrong?

A gate that passes few real validation pairs judges its own weakness, not the samples; one that
passes pairs whose lesion is misplaced or missing passes wrong samples too. Both are flagged.

Only **lesion pairs** (a non-empty mask) enter the pass / reject rates, θ calibration and the flag:
``mask_iou`` scores a pair whose masks are both empty 1.0 by convention, and rolling or erasing an
empty mask leaves it empty, so a lesion-free pair would always "pass" and could never be "rejected"
(13–15 % lesion-free validation pairs made pass + misplaced-reject = 1.000 at θ = 0.9). Lesion-free
real pairs get their own figure instead: the false-claim rate (:func:`false_claim_rate`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from lightning_modules.gating.batching import gate_in_batches
from lightning_modules.gating.validator_bank import erase_lesions

from lightning_modules.gating.flags import MIN_REAL_PASS, MIN_WRONG_REJECT  # noqa: F401  (re-exported)
# A lesion-free pair counts as a false claim when the gate's prediction covers more than this share of
# the image (0.25 %: 10 px at 64 px, 164 px at 256 px): a stray pixel or two is noise, not a lesion.
MIN_CLAIM_AREA = 0.0025
LESION_KEYS = ("real", "misplaced", "missing")


def has_lesion(masks: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which class-index masks (N,H,W) hold at least one foreground pixel."""
    return masks.flatten(1).gt(0).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)


def real_gate_ious(gate: Callable, images: torch.Tensor, masks: torch.Tensor) -> dict:
    """The gate on real validation pairs: lesion pairs as they are and made wrong; lesion-free pairs apart.

    On the lesion pairs (mask not empty), in their given order:

    * ``real``: each image with its own mask (a good gate passes these);
    * ``misplaced``: each image claims its own mask moved by half the image size (the lesion is elsewhere);
    * ``missing``: each image has its lesion erased (:func:`erase_lesions`) but claims its mask.

    On the lesion-free pairs (empty mask): ``normal_claim``, the share of the image (in [0, 1]) the gate
    predicts as lesion when the pair claims no lesion at all.

    Args:
        gate: ``gate(images (B,3,H,W), masks (B,H,W)) -> (iou (B,), pred (B,H,W))``.
        images: (N,3,H,W) in [0,1]. masks: (N,H,W) int64.

    Returns:
        ``{"real", "misplaced", "missing"}`` -> IoU (N_lesion,) and ``"normal_claim"`` -> (N_free,) CPU
        tensors (empty without such pairs).
    """
    lesion = has_lesion(masks)
    out = {k: torch.zeros(0) for k in (*LESION_KEYS, "normal_claim")}
    if lesion.any():
        img, msk = images[lesion], masks[lesion]
        h, w = msk.shape[-2:]
        out.update({"real": gate_in_batches(gate, img, msk)[0],
                    "misplaced": gate_in_batches(gate, img, msk.roll((h // 2, w // 2), (-2, -1)))[0],
                    "missing": gate_in_batches(gate, erase_lesions(img, msk)[0], msk)[0]})
    if (~lesion).any():
        pred = gate_in_batches(gate, images[~lesion], masks[~lesion])[1]
        out["normal_claim"] = (pred > 0).flatten(1).float().mean(1).cpu()
    return out


def false_claim_rate(claim_areas: torch.Tensor, min_area: float = MIN_CLAIM_AREA) -> float:
    """``gen/real_normal_false_claim_rate``: how often the gate sees a lesion in a lesion-free real image.

    The share of lesion-free real validation pairs (intended mask empty) on which the gate predicts
    lesion pixels covering more than ``min_area`` of the image. It does not depend on θ (a pair that
    claims no lesion has IoU 1 when nothing is predicted and 0 otherwise). NaN without lesion-free pairs.

    Args:
        claim_areas: (N_free,) predicted lesion share of each lesion-free pair (``real_gate_ious``'s
            ``normal_claim``).
    """
    return float((claim_areas > min_area).float().mean()) if len(claim_areas) else float("nan")


def calibrate_threshold(ious: dict, threshold: float, real_pass: Optional[float], floor: float = 0.0):
    """θ lowered to what ``real_pass`` of held-out real pairs reach; the sanity check uses other pairs.

    The even-indexed real validation lesion pairs calibrate θ and the odd-indexed ones check the gate, so
    the reported real pass rate is not the calibration target read back. θ is never raised: a strong
    validator keeps the configured θ. Nor does it drop below ``floor``: a weak validator misses some
    real lesions entirely (IoU 0), and θ = 0 would pass pairs with no overlap at all.

    Only the lesion pairs' IoUs (``real``, ``misplaced``, ``missing``) are split; other entries
    (``normal_claim``) are passed on whole.

    Args:
        ious: :func:`real_gate_ious` output.
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
    check = {k: (v[1::2] if k in LESION_KEYS else v) for k, v in ious.items()}
    return min(float(threshold), max(float(floor), reached)), check


def gate_sanity(ious: dict, threshold: float) -> dict:
    """The sanity figures of :func:`real_gate_ious` output at θ (rates are NaN without such pairs).

    ``gen/real_pass_rate``, ``gen/real_mean_iou`` and the rejection rates of misplaced / missing real
    lesions, on lesion pairs only; ``gen/real_normal_false_claim_rate`` on lesion-free pairs only
    (:func:`false_claim_rate`); ``gen/n_real_lesion_pairs`` / ``gen/n_real_normal_pairs``: how many
    pairs each figure rests on. ``threshold``: θ, a float or one per lesion pair (N_lesion,) (cross-fitting).
    """
    def rate(x: torch.Tensor) -> float:
        return float(x.float().mean()) if len(x) else float("nan")

    claims = ious.get("normal_claim", torch.zeros(0))
    return {"gen/real_pass_rate": rate(ious["real"] >= threshold), "gen/real_mean_iou": rate(ious["real"]),
            "gen/real_misplaced_reject_rate": rate(ious["misplaced"] < threshold),
            "gen/real_missing_reject_rate": rate(ious["missing"] < threshold),
            "gen/real_normal_false_claim_rate": false_claim_rate(claims),
            "gen/n_real_lesion_pairs": float(len(ious["real"])), "gen/n_real_normal_pairs": float(len(claims))}


def weak_rejects(metrics: dict) -> list:
    """Which kinds of wrong real pairs (``misplaced``, ``missing``) the gate rejects too rarely."""
    return [k.split("_")[1] for k in ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")
            if metrics.get(k, 1.0) < MIN_WRONG_REJECT]
