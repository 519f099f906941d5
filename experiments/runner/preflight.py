"""Checks ``meddiffaug run`` makes before it opens an MLflow run or trains anything.

A run that fails on its environment an hour in (an artifacts folder it cannot write, a truncated
weight file, data without a validation split) wastes the hour and leaves a FAILED run that looks
like a result. Each check here raises one :class:`ConfigError` or ``DataError`` naming the path or
key and what to do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from experiments.config import ConfigError


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new path would be made in)."""
    probe = path
    while True:
        try:
            if probe.exists() or probe == probe.parent:
                return probe
        except PermissionError:  # an ancestor we cannot traverse: that is where it fails
            return probe.parent
        probe = probe.parent


def require_writable(path: str | Path, key: str, is_file: bool = False) -> None:
    """Raise unless ``path`` (a folder, or a file if ``is_file``) exists writable or can be made.

    Args:
        path: The folder (or file) a run will write.
        key: The config key or variable that sets it, named in the message.
        is_file: ``path`` is a file (e.g. an sqlite database) rather than a folder.
    """
    path = Path(path).expanduser()
    probe = _nearest_existing(path)
    what = f"{path} ({key})"
    if probe == path and is_file:
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"cannot write {what}: permission denied; make it writable by you "
                              f"(chmod u+rw {path}) or set {key} to a file you can write.")
        probe = path.parent
    elif not probe.is_dir():
        raise ConfigError(f"cannot write {what}: {probe} is a file, not a folder; remove it or "
                          f"set {key} to another folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {what}: permission denied on {probe}; make it writable by "
                          f"you (chmod u+rwx {probe}, or ask its owner) or set {key} to a folder "
                          f"you can write.")


def check_outputs(cfg: DictConfig) -> None:
    """Every folder a run writes, and a local MLflow store, must be writable."""
    require_writable(cfg.artifacts_dir, "artifacts_dir")
    require_writable(cfg.output_dir, "output_dir")
    require_writable(cfg.data.cache_dir, "data.cache_dir")
    if not cfg.tracking.enabled:
        return
    env = os.environ.get("MLFLOW_TRACKING_URI")
    uri, key = (env, "MLFLOW_TRACKING_URI") if env else (cfg.tracking.uri, "tracking.uri")
    if uri.startswith("sqlite:///"):
        require_writable(uri[len("sqlite:///"):], key, is_file=True)
    elif uri.startswith("file:"):
        require_writable(uri[len("file:"):].removeprefix("//"), key)
    elif "://" not in uri:
        require_writable(uri, key)
    else:
        from experiments.tracking import require_server

        require_server(uri, key)
        return  # a tracking server owns its store and artifacts
    require_writable(cfg.tracking.artifact_root, "tracking.artifact_root")



def needs_base(cfg: DictConfig) -> bool:
    """Whether the stages of ``cfg`` load the diffusion base (fine-tune, or a latent gate)."""
    from experiments.runner.pipeline import required_stages

    stages = required_stages(cfg)
    return "finetune" in stages or ("validate" in stages
                                    and cfg.validator.mode in ("single_step", "full"))


def check_base(cfg: DictConfig) -> Optional[Path]:
    """The diffusion base folder is complete, its configs parse and its weights are whole.

    Only headers are read (safetensors checks that the file covers every tensor), so this costs
    milliseconds even for an SDXL folder.

    Returns:
        The resolved base folder, or None when no stage needs it.
    """
    if not needs_base(cfg):
        return None
    from safetensors import safe_open

    from lightning_modules.tiny_base import resolve_base

    base = cfg.diffusion.base_model
    path = resolve_base(base)  # FileNotFoundError naming the missing folder or subfolders
    fix = (f"copy it again from where diffusion.base_model ('{base}') came from"
           if str(base) != "tiny" else "restore it with git or rebuild it with `meddiffaug pretrain`")
    configs = {}
    for file in sorted(path.glob("*/*.json")):
        try:
            configs[file.relative_to(path).as_posix()] = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}, line {err.lineno}, column {err.colno}: not valid JSON "
                              f"({err.msg}); {fix}.") from err
    for file in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except PermissionError:
            raise
        except Exception as err:  # SafetensorError has no public base class beyond Exception
            raise ConfigError(f"weight file {file} is unreadable ({err}): it is truncated or "
                              f"not a safetensors file; {fix}.") from err
    _check_image_size(cfg, configs, path)
    if str(base) == "tiny":
        _check_tiny_size(cfg, configs, path)
    return path


def _check_image_size(cfg: DictConfig, configs: dict, path: Path) -> None:
    """``data.image_size`` must be divisible by the base's VAE and UNet downsampling."""
    vae, unet = configs.get("vae/config.json", {}), configs.get("unet/config.json", {})
    factor = 2 ** max(len(vae.get("block_out_channels", [0])) - 1, 0)
    factor *= 2 ** max(len(unet.get("down_block_types", [0])) - 1, 0)
    size = int(cfg.data.image_size)
    if size % factor:
        lo, hi = max(factor, size // factor * factor), (size // factor + 1) * factor
        raise ConfigError(f"'data.image_size' is {size}, but the diffusion base {path} needs a "
                          f"multiple of {factor} (its VAE and UNet downsample by {factor} in all); "
                          f"use data.image_size={lo} or {hi}.")


def _check_tiny_size(cfg: DictConfig, configs: dict, path: Path) -> None:
    """The shipped tiny base only at the size it was trained for, unless ``diffusion.allow_upscaled_tiny``.

    A real-data config at 512 px with a forgotten ``diffusion.base_model=`` would otherwise spend hours
    fine-tuning a 64 px model far outside what it learnt, and report the result as DiffAug's.
    """
    trained = int(configs.get("vae/config.json", {}).get("sample_size") or 0)  # the pixel size it was trained at
    size = int(cfg.data.image_size)
    if not trained or size <= trained or cfg.diffusion.get("allow_upscaled_tiny", False):
        return
    raise ConfigError(f"'data.image_size' is {size}, but diffusion.base_model is 'tiny': the shipped base "
                      f"{path} was trained at {trained} px (its vae/config.json sample_size). Add "
                      f"diffusion.base_model=<local SD inpainting folder> (a diffusers-format "
                      f"stable-diffusion-inpainting copy), or set data.image_size={trained}; to run the "
                      f"tiny base at {size} px anyway (a smoke test), set diffusion.allow_upscaled_tiny=true.")


def preflight(cfg: DictConfig) -> Any:
    """Run every check and return the set-up datamodule (the data checks run in its ``setup``).

    Raises:
        ConfigError: an output location is not writable, the base is damaged or mismatched.
        DataError: the data cannot give a meaningful run (see ``datamodules.checks``), or an external
            test set cannot be loaded or shares images with the run's data.
        FileNotFoundError: the diffusion base folder or one of its parts is missing.
    """
    from experiments.runner.pipeline import build_datamodule

    check_outputs(cfg)
    split_file = cfg.data.split_file
    if split_file is not None and not Path(split_file).expanduser().is_file():
        raise ConfigError(f"'data.split_file' {split_file} does not exist; write a JSON file with lists "
                          f"train, val and test of sample ids (as in outputs/splits/), or set "
                          f"data.split_file=null to split by seed.")
    check_base(cfg)
    datamodule = build_datamodule(cfg)
    from experiments.runner.external_tests import external_sets

    external_sets(cfg, datamodule)  # data.external_tests: loaded (kept on the datamodule) and checked against its data
    return datamodule
