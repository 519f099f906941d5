"""The gate's model trained by every rank under a launcher (torchrun, SLURM's srun): DDP, not rank 0 alone.

Under a launcher :mod:`experiments.runner.distributed` runs the validate stage on rank 0 alone. When the gate
has a model still to train (the latent validator, or the pixel gate's segmenter), every rank first
joins that training here (Lightning's DDP over the launcher's process group); rank 0 saves the model
where the stage then finds it: the latent validator in its cache (:func:`validator_cache_path`, as a
single-process run would), the pixel segmenter in the stage's folder (``PIXEL_SEGMENTER``).
"""
from __future__ import annotations

from pathlib import Path

from datamodules.io import read_manifest
from experiments.runner.gate_training import (PIXEL_SEGMENTER, normal_pool, save_pixel_segmenter, save_validator, train_latent_validator,
                                       train_pixel_segmenter, validator_settings)
from experiments.stages.validate.gate import (device_of, load_diffusion, reuse_validator, stage_prompt,
                                             validator_cache_path)
from experiments.tracking import is_rank_zero

LATENT_MODES = ("single_step", "full")


def _prompt(cfg, datamodule, upstream: dict) -> str:
    """The prompt the validate stage will use (read from the generate stage's manifest)."""
    return stage_prompt(cfg, datamodule, read_manifest(Path(upstream["generate"]) / "manifest.jsonl"))


def gate_training_needed(cfg, datamodule, workdir: Path, upstream: dict) -> bool:
    """True when the gate of ``cfg.validator.mode`` has a model to train that nothing saved yet."""
    mode = str(cfg.validator.mode)
    if mode == "pixel":
        return not (Path(workdir) / PIXEL_SEGMENTER).is_file()
    if mode not in LATENT_MODES or str(cfg.validator.judge) == "fold_ensemble":
        return False  # the fold validators of an ensemble judge are cross-fitted inside the stage (rank 0)
    datamodule.setup()
    settings = validator_settings(cfg, _prompt(cfg, datamodule, upstream), int(datamodule.num_classes))
    return reuse_validator(cfg, upstream, settings)[0] is None


def train_gate_model(cfg, datamodule, workdir: Path, upstream: dict, logger=None) -> None:
    """Train the gate's model on this rank (every rank calls it together) and, on rank 0, save it.

    Checkpoints go under ``workdir/checkpoints/`` as in the single-process stage, so a killed run resumes.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    datamodule.setup()
    if str(cfg.validator.mode) == "pixel":
        segmenter = train_pixel_segmenter(cfg, datamodule, workdir, logger)
        if is_rank_zero():
            save_pixel_segmenter(workdir / PIXEL_SEGMENTER, segmenter)
        return
    device, few = device_of(cfg), list(datamodule.split_indices["train_few"])
    prompt, ncls = _prompt(cfg, datamodule, upstream), int(datamodule.num_classes)
    diffusion, _ = load_diffusion(cfg, upstream)
    diffusion = diffusion.to(device).eval()
    # the datamodule's uint8 arrays (n,S,S,3), (n,S,S): the bank converts and moves them a batch at a time
    validator = train_latent_validator(cfg, diffusion, datamodule.images[few], datamodule.masks[few], prompt, ncls,
                                       workdir, logger, pool=normal_pool(datamodule))
    if is_rank_zero():
        settings = validator_settings(cfg, prompt, ncls)
        save_validator(validator_cache_path(cfg, upstream, settings), validator, settings)
