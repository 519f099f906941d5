"""One run of ``benchmarks.gate_trust``: a gate's in-run cross-fitted check and its truth on held-out pairs.

The run sees what a user has: its labelled pairs (``train_few`` + ``val``). The truth comes from a
procedural stream no run ever draws from (:data:`HELDOUT_STREAM`), lesion pairs only.
"""
from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from datamodules.io import atomic_write_text, short_hash
from datamodules.procedural import render_procedural
from datamodules.synthetic import to_tensor
from experiments.runner.gate_training import normal_pool, train_latent_validator
from experiments.stages.validate.crossfit import crossfit_scorer
from experiments.stages.validate.gate import make_gate
from experiments.stages.validate.sanity import flag_reasons
from experiments.tracking import git_sha
from lightning_modules.gating.crossfit import check_ious, crossfit_thresholds
from lightning_modules.gating.ensemble import EnsembleValidator
from lightning_modules.gating.sanity import gate_sanity, has_lesion, real_gate_ious

HELDOUT_STREAM = "gate_trust"  # reserved for this benchmark: no datamodule renders it


def heldout_pairs(kind: str, n: int, size: int, seed: int):
    """``n`` lesion pairs of the reserved stream: images (n,3,S,S) in [0,1], masks (n,S,S) int64."""
    images, masks, _ = render_procedural(kind, n + n // 2 + 8, size, seed, stream=HELDOUT_STREAM)
    masks = torch.from_numpy(masks.astype(np.int64))
    keep = torch.nonzero(has_lesion(masks))[:n, 0]
    if len(keep) < n:
        raise RuntimeError(f"the {HELDOUT_STREAM} stream of {kind} gave {len(keep)} lesion pairs, {n} asked")
    return to_tensor(images[keep.numpy()]), masks[keep]


def _rates(ious: dict, theta) -> dict:
    m = gate_sanity(ious, theta)
    return {"real_pass_rate": m["gen/real_pass_rate"], "misplaced_reject_rate": m["gen/real_misplaced_reject_rate"],
            "missing_reject_rate": m["gen/real_missing_reject_rate"], "n_lesion_pairs": m["gen/n_real_lesion_pairs"]}


def judge_run(cfg, datamodule, diffusion, kind: str, n_heldout: int) -> dict:
    """The gate of ``cfg`` (a latent validator mode, ``validator.crossfit_folds`` >= 2) for one run of procedural ``kind``.

    Returns:
        ``{"in_run": rates cross-fitted over the labelled pairs, "heldout": rates of the run's gate (trained
        on ``train_few``, θ from the cross-fitted scores) on ``n_heldout`` reserved lesion pairs,
        "heldout_ensemble": the same for the ensemble of the fold validators, "theta", "flagged"}``.
    """
    v, prompt = cfg.validator, datamodule.prompt
    ncls, few = int(datamodule.num_classes), datamodule.split_indices["train_few"]
    with tempfile.TemporaryDirectory() as workdir:
        scorer = crossfit_scorer(cfg, datamodule, Path(workdir), diffusion, prompt)
        scores = scorer()
        validator = train_latent_validator(cfg, diffusion, datamodule.images[few], datamodule.masks[few], prompt,
                                           ncls, Path(workdir) / "final", pool=normal_pool(datamodule))
    theta, per_pair = crossfit_thresholds(scores, float(v.iou_threshold), v.calibrate_real_pass,
                                          v.calibrate_min_threshold)
    in_run = _rates(check_ious(scores), per_pair)
    metrics = {"gen/real_pass_rate": in_run["real_pass_rate"],
               "gen/real_misplaced_reject_rate": in_run["misplaced_reject_rate"],
               "gen/real_missing_reject_rate": in_run["missing_reject_rate"]}
    flagged = bool(flag_reasons(metrics, str(v.mode), theta, v.calibrate_real_pass is not None))
    images, masks = heldout_pairs(kind, n_heldout, int(cfg.data.image_size), int(cfg.seed))
    out = {"in_run": in_run, "theta": theta, "flagged": flagged}
    # the run's gate, and the ensemble of the fold validators (trained for the check anyway) at the same θ
    for key, judge in (("heldout", validator), ("heldout_ensemble", EnsembleValidator(scorer.validators))):
        gate = make_gate(str(v.mode), cfg, prompt, ncls, torch.device("cpu"), diffusion, judge)
        out[key] = _rates(real_gate_ious(gate, images, masks), theta)
    return out


@functools.lru_cache(maxsize=2)
def _base_diffusion(name: str):
    """The base diffusion model, loaded once per process (every seed's gate uses its ε̂)."""
    from lightning_modules.diffusion import InpaintingDiffusion  # heavy: only when a seed runs
    return InpaintingDiffusion.from_base(name).eval()


def judge_run_once(config: Callable, key: dict, records: str, run: bool = True) -> Optional[dict]:
    """:func:`judge_run` for one seed, read from its record under ``records`` when one exists.

    Args:
        config: ``() -> cfg`` of the run (built only when the seed runs).
        key: what identifies the run (modality, gate, seed, folds, held-out pairs, overrides); its hash
            names the file ``<modality>-<gate>-s<seed>-<hash>.json``.

    Returns:
        The :func:`judge_run` result; a new one is written atomically with ``key``, the commit of the
        code and the seconds it took. None when there is no record and ``run`` is False.
    """
    path = Path(records) / f"{key['modality']}-{key['gate']}-s{key['seed']}-{short_hash(key)}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        print(f"[gate_trust] {key['modality']} {key['gate']} seed {key['seed']}: from {path}", file=sys.stderr)
        return record["result"]
    if not run:
        return None
    from experiments.runner.pipeline import build_datamodule

    start, cfg = time.time(), config()
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    result = judge_run(cfg, datamodule, _base_diffusion(str(cfg.diffusion.base_model)), key["modality"],
                       int(key["heldout"]))
    record = {"key": key, "commit": git_sha(), "seconds": round(time.time() - start, 1), "result": result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, sort_keys=True, indent=1) + "\n")
    print(f"[gate_trust] {key['modality']} {key['gate']} seed {key['seed']}: {json.dumps(result)} "
          f"({record['seconds']:.0f} s) -> {path}", file=sys.stderr, flush=True)
    return result
