"""Cross-fitting the gate's sanity check: every labelled lesion pair judged by a gate that never saw it.

With 16 labelled pairs and 4 of them for validation, a check on the validation pairs rests on 1–2
lesion pairs (a pass rate of 0, 0.5 or 1). Cross-fitting splits all labelled pairs into K folds,
trains a gate on K−1 of them and scores the held-out fold's lesion pairs as they are, misplaced and
missing (:func:`lightning_modules.gating.sanity.real_gate_ious`), so the rates rest on every lesion
pair. θ calibration stays out-of-sample too: a fold's pairs are checked at the θ that the *other*
folds' cross-fitted scores reach (:func:`crossfit_thresholds`); the θ the run applies is the one all
folds' scores reach.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lightning_modules.gating.sanity import LESION_KEYS, has_lesion, real_gate_ious


def crossfit_folds(masks: torch.Tensor, k: int, seed: int) -> List[np.ndarray]:
    """``k`` folds of pair indices, lesion pairs and lesion-free pairs each dealt evenly across them.

    Args:
        masks: (N,H,W) class-index masks of the labelled pairs.
        k: folds (>= 2, at most N).
        seed: draws the order in which pairs are dealt.

    Returns:
        ``k`` sorted int arrays that partition ``range(N)``.
    """
    n = len(masks)
    if not 2 <= k <= n:
        raise ValueError(f"validator.crossfit_folds={k} needs 2 <= folds <= the {n} labelled pairs; "
                         f"lower validator.crossfit_folds or set it to 0 (off).")
    rng = np.random.default_rng(seed)
    lesion = has_lesion(masks).numpy()
    # lesion pairs first, then lesion-free ones, each shuffled and dealt round-robin: fold sizes differ by <= 1
    order = np.concatenate([rng.permutation(np.flatnonzero(lesion)), rng.permutation(np.flatnonzero(~lesion))])
    return [np.sort(order[f::k]) for f in range(k)]


def crossfit_ious(fit_gate: Callable[[np.ndarray], Callable], images: torch.Tensor, masks: torch.Tensor,
                  folds: Sequence[np.ndarray]) -> dict:
    """:func:`real_gate_ious` of each fold under a gate fitted on the other folds, concatenated.

    Args:
        fit_gate: ``fit_gate(train_indices) -> gate`` (an image-space gate, see ``real_gate_ious``).
        images: (N,3,H,W) in [0,1]. masks: (N,H,W) int64.
        folds: from :func:`crossfit_folds`.

    Returns:
        ``real_gate_ious``'s keys over all folds, plus ``"fold"`` (N_lesion,) int64: the fold of each
        lesion pair's entry.
    """
    parts, fold_of = [], []
    for f, held in enumerate(folds):
        train = np.sort(np.concatenate([g for j, g in enumerate(folds) if j != f]))
        held_t = torch.as_tensor(held, dtype=torch.long)
        ious = real_gate_ious(fit_gate(train), images[held_t], masks[held_t])
        parts.append(ious)
        fold_of.append(torch.full((len(ious["real"]),), f, dtype=torch.long))
    out = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    out["fold"] = torch.cat(fold_of)
    return out


def _reached(real: torch.Tensor, threshold: float, real_pass: float, floor: float) -> float:
    """θ lowered (never raised) to the IoU that ``real_pass`` of ``real`` reach, not below ``floor``."""
    real = real[~torch.isnan(real)]
    if not len(real):
        return float(threshold)
    return min(float(threshold), max(float(floor), float(torch.quantile(real.float(), 1.0 - float(real_pass)))))


def crossfit_thresholds(ious: dict, threshold: float, real_pass: Optional[float],
                        floor: float = 0.0) -> Tuple[float, torch.Tensor]:
    """The θ the run applies and, per lesion pair, the θ its check uses.

    Without calibration (``real_pass`` None) both are ``threshold``. With it, the run's θ is what
    ``real_pass`` of all cross-fitted real IoUs reach; a pair of fold f is checked at the θ the other
    folds' real IoUs reach, so no pair's rate reads back a θ calibrated on itself.

    Args:
        ious: :func:`crossfit_ious` output.

    Returns:
        ``(θ_run, θ per lesion pair (N_lesion,))``.
    """
    fold = ious["fold"]
    if real_pass is None:
        return float(threshold), torch.full((len(fold),), float(threshold))
    per_pair = torch.empty(len(fold))
    for f in fold.unique():
        per_pair[fold == f] = _reached(ious["real"][fold != f], threshold, real_pass, floor)
    return _reached(ious["real"], threshold, real_pass, floor), per_pair


def check_ious(ious: dict) -> dict:
    """The entries of :func:`crossfit_ious` output that ``gate_sanity`` reads (``fold`` dropped)."""
    return {k: v for k, v in ious.items() if k in (*LESION_KEYS, "normal_claim")}
