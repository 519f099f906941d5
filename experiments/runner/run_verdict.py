"""Whether a finished run's numbers are a result at all, read from its final metrics.

A run can finish every stage and still measure nothing. A segmenter whose best validation Dice
stayed under ``segmenter.collapse_dice`` predicts (almost) no lesion anywhere, so its test Dice
says nothing about the method. An augmented run whose gate accepted no synthetic pair trained on
real data only, so its numbers belong to the real-only arm, not to the method it is named after.
``meddiffaug run`` prints these and exits :data:`EXIT_NOT_A_RESULT` instead of 0, so a script
never files them as results. Grids and sweeps keep such runs: a table counts collapsed runs
instead of hiding them, which would bias the mean.
"""
from __future__ import annotations

import math
from typing import List, Mapping, Tuple

from omegaconf import DictConfig

from experiments.runner.external_tests import external_caveats
from experiments.stages.validate.sanity import flag_reasons

EXIT_NOT_A_RESULT = 3
AUGMENTING_METHODS = ("diffusion", "copy_paste")


def run_verdicts(cfg: DictConfig, metrics: Mapping[str, float]) -> Tuple[List[str], List[str]]:
    """Problems with a run's numbers, each one line that names the metric and what to do.

    Only the stages that ran are judged: a run without the segment stage has no segmenter verdict.

    Args:
        cfg: the run's resolved config.
        metrics: the run's final metrics (``seg/collapsed``, ``val/dice``, ``gen/n_accepted``, ...).

    Returns:
        ``(not_a_result, caveats)``: the first make the numbers meaningless (exit 3), the second
        make them less trustworthy (printed, exit 0).
    """
    not_a_result: List[str] = []
    caveats: List[str] = []
    if metrics.get("seg/collapsed", 0.0) >= 0.5:
        dice = metrics.get("val/dice", float("nan"))
        seen = "no validation Dice was computed" if math.isnan(dice) else f"its best validation Dice is {dice:.3f}"
        not_a_result.append(
            f"the segmenter collapsed: {seen}, under segmenter.collapse_dice={cfg.segmenter.collapse_dice} "
            "(seg/collapsed=1), so the test numbers measure a model that finds (almost) no lesion. Train longer "
            "(trainer.max_steps), check the masks with `meddiffaug data inspect`, or try another seed.")
    segmented = "test/dice" in metrics
    augmenting = cfg.augment.method in AUGMENTING_METHODS and cfg.augment.ratio > 0
    if segmented and augmenting and metrics.get("gen/n_accepted", 1.0) == 0:
        n = metrics.get("gen/n_samples")
        of = f" of the {int(n)}" if n is not None and not math.isnan(n) else ""
        not_a_result.append(
            f"augment.method={cfg.augment.method}, but none{of} synthetic pairs was accepted "
            f"(gen/n_accepted=0): the segmenter trained on real data only, so these are real-only numbers. "
            + _rejected_by(cfg, metrics))
    if metrics.get("gen/gate_flagged", 0.0) >= 0.5:  # the validate stage's reasons, also for a cached stage
        theta = metrics.get("gen/iou_threshold", cfg.validator.iou_threshold)
        caveats += flag_reasons(dict(metrics), str(cfg.validator.mode), theta, cfg.validator.calibrate_real_pass is not None)
    caveats += external_caveats(cfg, metrics)  # a configured external set without a Dice
    return not_a_result, caveats


def _rate(metrics: Mapping[str, float], key: str) -> float:
    value = metrics.get(key, float("nan"))
    return 0.0 if value is None or math.isnan(value) else float(value)


def _rejected_by(cfg: DictConfig, metrics: Mapping[str, float]) -> str:
    """Which component rejected every synthetic pair (early rejection, the gate, the quality filter) and
    a remedy that changes it; read from the validate stage's ``gen/*`` rates."""
    v, mode = cfg.validator, str(cfg.validator.mode)
    total = _rate(metrics, "gen/n_samples")
    theta = metrics.get("gen/iou_threshold", v.iou_threshold)
    if total and _rate(metrics, "gen/n_early_rejected") >= total:
        return (f"Early rejection in the generate stage stopped every sample (validator.early_reject_t="
                f"{v.early_reject_t}): unset validator.early_reject_t"
                + (f", or lower validator.iou_threshold (now {theta:g})." if theta > 0 else "."))
    if mode != "none" and _rate(metrics, "gen/iou_pass_rate") == 0:
        fixes = [f"lower validator.iou_threshold (now {theta:g})"] if theta > 0 else []
        if v.calibrate_real_pass is None:
            fixes.append("set validator.calibrate_real_pass=0.8")
        fixes += [f"or switch the gate off (validator.mode=none; now {mode})"]
        return f"The {mode} gate rejected every sample: " + ", ".join(fixes) + "."
    outlier, near = _rate(metrics, "gen/quality_reject_rate"), _rate(metrics, "gen/near_copy_rate")
    if outlier or near:
        passed = "none was gated" if mode == "none" else f"the {mode} gate passed some"
        return (f"The quality filter rejected every pair left ({passed}; {outlier:.0%} outliers, {near:.0%} "
                f"near-copies of their source): raise validator.quality_quantile (now {v.quality_quantile:g}) "
                f"or lower validator.near_copy_quantile (now {v.near_copy_quantile:g}), or set "
                "validator.quality_filter=false.")
    return "Nothing was generated to accept: generate more (generation.n_samples)."
