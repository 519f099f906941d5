"""Signatures: which config values a stage's result depends on, and the one short hash.

Every stage declares its inputs with :func:`subtree` (a config section minus the keys that change
no result); :func:`datamodules.io.short_hash` turns any JSON-able payload into the hex digest used
for stage folders, grid cells and study trials alike.
"""
from __future__ import annotations

from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf


# Keys that change no result: excluded from every signature.
# data.external_tests: read only by the segment stage, which adds them to its own inputs when set.
IGNORED = {"data": {"num_workers", "cache_dir", "external_tests"},
           "trainer": {"accelerator", "devices", "strategy", "log_every_n_steps"},
           # recomputed activations and where the frozen parts wait change memory, not the weights
           # allow_upscaled_tiny only lets preflight pass: the stages never read it
           "diffusion": {"gradient_checkpointing", "offload_frozen", "allow_upscaled_tiny"}}

# Options whose default reproduces the results of configs that do not set them: left out of the
# signature at that value, so adding an option does not invalidate every cached stage.
NEUTRAL = {"validator": {"calibrate_real_pass": None, "crossfit_folds": 0, "pasted_pairs": 0,
                         "quality_features": "random_resnet18", "features": "latent",
                         "judge": "final"},
           "data": {"split_file": None, "n_val": None, "n_normal": 0, "test_pool": None},
           "augment": {"synthetic_only": False},
           "diffusion": {"mixed_precision": None, "grad_accum": 1, "ema_decay": None, "attention": "sdpa",
                         "optimizer": "adamw"}}


def subtree(cfg: DictConfig, section: str) -> Dict[str, Any]:
    """``cfg[section]`` as plain values, without its ignored keys and its neutral keys at their neutral value."""
    node = OmegaConf.to_container(cfg[section], resolve=True)
    if section == "data" and node.get("root") is not None:  # by content: another mount reuses the cache
        from experiments.cache.data_identity import data_root_identity

        node["root"] = data_root_identity(cfg)
    neutral = NEUTRAL.get(section, {})
    return {k: v for k, v in node.items()
            if k not in IGNORED.get(section, set()) and not (k in neutral and v == neutral[k])}
