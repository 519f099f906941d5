"""Validate stage: gate → sanity → filter → erode → write, one module each.

Reads the generate stage's ``manifest.jsonl``; writes ``accepted.jsonl``, ``decisions.jsonl``,
eroded masks under ``masks/`` and ``accept_reject.png``; returns ``gen/*`` metrics including the gate
sanity check on real validation lesion pairs, or cross-fitted over all labelled pairs with ``validator.crossfit_folds``
(``gen/real_pass_rate``, ``gen/gate_flagged``), the false-claim
rate on lesion-free ones (``gen/real_normal_false_claim_rate``), the quality filter's rejection rate on
held-out real images (``gen/quality_real_reject_rate``) and which validator judged (``gen/validator_prompted``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.rows import LazyRows
from datamodules.synthetic import load_generated, to_tensor
from experiments.cache.signatures import subtree
from experiments.stages.validate.crossfit import crossfit_cache, crossfit_scorer, fold_ensemble
from experiments.stages.validate.filter import feature_extractor, quality_filter
from experiments.stages.validate.gate import FULL_STEPS, device_of, gate, load_diffusion, stage_prompt
from experiments.stages.validate.gate_model import gate_training_needed, train_gate_model  # noqa: F401 (pipeline)
from experiments.stages.validate.sanity import sanity
from experiments.stages.validate.write import pred_view, pred_writer, save_accept_reject, write_decisions

# Part of the stage's signature: raise it when this stage's code changes what it produces for the same
# config (see experiments.runner.pipeline), so cached results of the older code are not reused. Version 1
# judges the gate on lesion pairs only and erodes only the newly generated lesion.
VERSION = 1
# The pixel gate's own version: its segmenter follows segmenter.encoder_depth and
# segmenter.decoder_channels (experiments.runner.builders.build_segmenter); other gates are unaffected.
PIXEL_GATE_VERSION = 2


def inputs(cfg: DictConfig) -> Dict[str, Any]:
    """The config values this stage's result depends on (its part of the signature)."""
    validator = subtree(cfg, "validator")
    if validator.get("calibrate_real_pass") is None:  # the floor only acts on a calibrated θ
        validator.pop("calibrate_min_threshold", None)
    if not validator.get("quality_filter"):
        validator.pop("quality_features", None)  # no filter to use them
    out = {"validator": validator, "base_model": cfg.diffusion.base_model, "prompt": cfg.diffusion.prompt}
    if cfg.validator.mode == "pixel":  # the pixel gate trains a segmenter on the real pairs
        out["segmenter"] = subtree(cfg, "segmenter")
        if cfg.segmenter.encoder_depth != 5 or cfg.segmenter.decoder_channels:
            out["pixel_gate_version"] = PIXEL_GATE_VERSION
    return out


def run_validate(cfg, datamodule, workdir: Path, upstream: dict, logger=None, diffusion=None,
                 segmenter=None, feature_fn=None, full_steps: int = FULL_STEPS, validator=None) -> dict:
    """Gate, filter and erode the generated pairs of ``upstream["generate"]``.

    Args:
        cfg: resolved config (``cfg.validator`` drives everything).
        datamodule: set-up datamodule (real ``train_few`` trains the gate, ``val`` checks it).
        workdir: this stage's folder.
        upstream: ``{"generate": Path, "finetune": Path (diffusion runs only)}``.
        logger: Lightning logger for the gate's training, or None.
        diffusion: a ready diffusion object (tests, benchmarks); default loaded from upstream.
        segmenter: a ready pixel segmenter (``predict_masks``) for ``mode == "pixel"``; default trained.
        validator: a ready latent validator for the latent modes; default: the one the generate stage
            trained for early rejection (``validator.pt``, when its settings match), else trained here.
            With ``validator.judge=fold_ensemble`` the cross-fitted fold validators judge instead.
        feature_fn: feature extractor of the quality filter (tests); default by ``validator.quality_features``:
            the random resnet18 of ``gating.fidelity`` or the diffusion model's VAE (``gating.vae_features``).
        full_steps: DDIM steps of the ``full`` gate.

    Returns:
        ``gen/*`` metrics: accept_rate, n_accepted, n_samples, mean_iou, iou_threshold (θ applied),
        iou_pass_rate, quality_reject_rate, near_copy_rate, real_pass_rate, real_misplaced_reject_rate,
        real_missing_reject_rate, gate_flagged (these four on real lesion pairs only: the validation pairs, or
        with ``validator.crossfit_folds`` = K every labelled pair, cross-fitted; then also crossfit_folds = K),
        real_normal_false_claim_rate
        (lesion-free real pairs only), n_real_lesion_pairs, n_real_normal_pairs, normal_pool_false_claim_rate
        and n_normal_pool (with a ``normal`` pool: ``data.n_normal``), real_quality_pass_rate,
        quality_real_reject_rate, validator_prompted (latent gates), validate_sps, n_early_rejected.
        Samples the generate stage rejected early (``early_rejected`` rows) count as rejected.
    """
    workdir, gen_dir = Path(workdir), Path(upstream["generate"])
    (workdir / "masks").mkdir(parents=True, exist_ok=True)
    mode = str(cfg.validator.mode)
    datamodule.setup()
    # row views: only the rows read (validation, sources, the normal pool) are converted, a batch at a time
    real = (LazyRows(lambda rows: to_tensor(datamodule.images[rows]), n=len(datamodule.images)),
            LazyRows(lambda rows: torch.from_numpy(datamodule.masks[rows].astype(np.int64)), n=len(datamodule.masks)))
    gen = load_generated(gen_dir, real[0].shape[-1])
    n, total = len(gen.rows), len(gen.rows) + len(gen.early)
    # the prompt generation conditioned on (recorded per row), else the config's / dataset's
    prompt = stage_prompt(cfg, datamodule, gen.rows + gen.early)
    metrics: dict = {"gen/n_samples": float(total), "gen/n_early_rejected": float(len(gen.early))}

    # 1. gate and 2. its sanity check on real pairs (θ calibrated there when asked)
    ious, description, theta = torch.full((n,), float("nan")), "none", float(cfg.validator.iou_threshold)
    if mode != "none":
        diffusion, validator, crossfit, sources = _judge(cfg, datamodule, workdir, upstream, diffusion, validator,
                                                         prompt, full_steps)
        judged = gate(cfg, datamodule, workdir, upstream, gen, real, prompt, logger, diffusion=diffusion,
                      validator=validator, segmenter=segmenter, full_steps=full_steps,
                      sink=pred_writer(workdir, gen.rows), **sources)
        ious, description = judged["ious"], judged["description"]
        diffusion = judged["diffusion"]  # reused by the quality filter's VAE features
        theta, checks = _check(cfg, datamodule, workdir, judged, real, prompt, full_steps, crossfit)
        metrics.update(judged["metrics"], **checks, **{"gen/mean_iou": float(ious.mean()) if n else 0.0,
                                                        "gen/iou_threshold": theta})
    else:  # no gate: nothing real can fail it
        metrics.update({"gen/real_pass_rate": 1.0, "gen/gate_flagged": 0.0})
    iou_ok = torch.ones(n, dtype=torch.bool) if mode == "none" else ious >= theta
    # 3. quality filter
    if feature_fn is None and cfg.validator.quality_filter and n:
        feature_fn, _ = feature_extractor(cfg, lambda: diffusion if diffusion is not None else _base_diffusion(cfg))
    score, outlier, near, quality = quality_filter(cfg, datamodule, real[0], gen, feature_fn)
    metrics.update(quality)
    accepted = iou_ok & ~outlier & ~near
    # 4. erosion of the accepted masks and 5. the stage's files
    decision = dict(ious=ious, score=score, iou_ok=iou_ok, outlier=outlier, near=near, accepted=accepted, theta=theta,
                    preds_written=mode != "none")
    write_decisions(workdir, gen_dir, gen, decision, int(cfg.validator.erode_px), description)
    if n:
        preds = pred_view(workdir, gen.rows) if mode != "none" else None
        save_accept_reject(workdir / "accept_reject.png", gen.images, gen.masks, preds, ious, accepted)
    metrics.update(_verdict_rates(decision, total, len(gen.early)))
    return metrics


def _judge(cfg, datamodule, workdir: Path, upstream: dict, diffusion, validator, prompt: str, full_steps: int):
    """``(diffusion, validator, crossfit scorer or None, sources for the description)`` of the judge.

    ``validator.judge=fold_ensemble``: the cross-fitted fold validators are trained first and judge
    together; their scorer has run, so the sanity check reads its scores. Otherwise all is as given.
    """
    if str(cfg.validator.judge) != "fold_ensemble":
        return diffusion, validator, None, {}
    sources = {"validator_source": f"ensemble of the {int(cfg.validator.crossfit_folds)} cross-fitted fold validators"}
    if diffusion is None:
        diffusion, sources["diffusion_source"] = load_diffusion(cfg, upstream)
        diffusion = diffusion.to(device_of(cfg)).eval()
    ensemble, crossfit = fold_ensemble(cfg, datamodule, workdir, diffusion, prompt, full_steps)
    return diffusion, ensemble, crossfit, sources


def _check(cfg, datamodule, workdir: Path, judged: dict, real, prompt: str, full_steps: int, crossfit):
    """``(θ, gen/* figures)`` of the gate's sanity check on real pairs: the validation pairs, or with
    ``validator.crossfit_folds`` every labelled pair cross-fitted (``crossfit``: a scorer that has run, or
    None to make one), the normal pool judged by the gate that judged the samples."""
    folds, cache, val = int(cfg.validator.crossfit_folds), judged["sanity_cache"], datamodule.split_indices["val"]
    pool = list(datamodule.split_indices.get("normal") or [])  # lesion-free sources outside the budget
    if folds and crossfit is None:
        crossfit = crossfit_scorer(cfg, datamodule, workdir, judged["diffusion"], prompt, full_steps)
    theta, checks = sanity(cfg, judged["gate"], real[0][val], real[1][val],
                           crossfit_cache(cache, folds) if folds else cache,
                           pool_images=real[0][pool] if pool else None, crossfit=crossfit)
    if folds:
        checks["gen/crossfit_folds"] = float(folds)
    return theta, checks


def _verdict_rates(decision: dict, total: int, n_early: int) -> dict:
    """The stage's rates over all ``total`` samples (the ``n_early`` early-rejected ones count as rejected)."""
    accepted, n = decision["accepted"], len(decision["accepted"])
    share = (lambda count: float(count) / total) if total else (lambda count: 0.0)
    return {"gen/n_accepted": float(accepted.sum()), "gen/accept_rate": share(accepted.sum()),
            "gen/early_reject_rate": share(n_early), "gen/iou_pass_rate": share(decision["iou_ok"].sum()),
            "gen/quality_reject_rate": float(decision["outlier"].float().mean()) if n else 0.0,
            "gen/near_copy_rate": float(decision["near"].float().mean()) if n else 0.0}


def _base_diffusion(cfg):
    """The base diffusion model (for its VAE: frozen in every fine-tune, so the base's is the fine-tuned one's)."""
    from lightning_modules.diffusion import InpaintingDiffusion  # lazy: heavy, only for vae features

    return InpaintingDiffusion.from_base(cfg.diffusion.base_model).to(device_of(cfg)).eval()
