"""``data.external_tests``: test sets from elsewhere (entries: :mod:`experiments.config.external`), loaded,
checked against the run's data and evaluated with the selected checkpoint.

The sets are loaded beside the run's datamodule, never inside it, so
their pairs enter no training, validation, calibration or selection; a set holding one of the run's
own images is an error. Only the segment stage reads them, so only its signature holds them, and
only when the list is not empty (committed runs keep their signatures).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Dict, List

from omegaconf import DictConfig

from datamodules.errors import DataError
from experiments.config.external import external_specs

def signature_inputs(cfg: DictConfig) -> Dict[str, Any]:
    """The segment stage's extra inputs: ``{}`` without external sets (old signatures stay valid).

    A root enters by content (as ``data.root`` does), so another mount of the same files reuses the stage.
    """
    from experiments.cache.data_identity import folder_identity

    specs = external_specs(cfg)
    if not specs:
        return {}
    out = []
    for spec in specs:
        item = {k: v for k, v in asdict(spec).items() if v not in (None, {})}
        if spec.root is not None:
            item["root"] = folder_identity(spec.name, spec.root, image_size=int(cfg.data.image_size), **spec.layout)
        else:
            from datamodules.procedural_center_b import CENTER_B_VERSION

            item["version"] = CENTER_B_VERSION[spec.name[len("procedural_"):]]
        out.append(item)
    return {"external_tests": out}


def external_sets(cfg: DictConfig, datamodule: Any) -> list:
    """The run's external sets, loaded once per datamodule and checked against its data.

    Raises:
        DataError: a set's classes differ from the run's, or it holds an image the run trains,
            validates or selects on (the overlapping pairs are named).
    """
    from datamodules.external import load_external_set, training_overlap

    specs = external_specs(cfg, DataError)
    if not specs:
        return []
    key = json.dumps([asdict(s) for s in specs], sort_keys=True) + f"@{cfg.data.image_size}"
    cache = datamodule.__dict__.setdefault("_external_sets", {})
    if key in cache:
        return cache[key]
    datamodule.setup()
    sets = []
    for spec in specs:
        ext = load_external_set(spec.name, spec.label, int(cfg.data.image_size), root=spec.root, center=spec.center,
                                n=spec.n, cache_dir=cfg.data.cache_dir, **spec.layout)
        if len(ext.classes) != datamodule.num_classes:
            raise DataError(f"external test set '{spec.label}' ({spec.name}) has classes {ext.classes}, the run's "
                            f"data {cfg.data.name} has {tuple(datamodule.classes)}: test on a set of the same task.")
        overlap = training_overlap(ext, datamodule)
        if overlap:
            shown = ", ".join(f"{e} = {r} ({s})" for e, r, s in overlap[:5])
            raise DataError(f"external test set '{spec.label}' ({spec.name} at {spec.root or spec.center}) shares "
                            f"{len(overlap)} of its {len(ext.ids)} images with the run's own data "
                            f"{cfg.data.name} (same image content): {shown}{' …' if len(overlap) > 5 else ''}. "
                            f"An external test must come from elsewhere: remove those files from it or "
                            f"test on another dataset.")
        sets.append(ext)
    cache[key] = sets
    return sets


def external_caveats(cfg: DictConfig, metrics: Dict[str, float]) -> List[str]:
    """One line per configured external set that has no Dice in ``metrics`` (for the run verdict)."""
    import math

    if "test/dice" not in metrics:  # the segment stage did not run: nothing was tested
        return []
    lines = []
    for spec in external_specs(cfg):
        dice = metrics.get(f"test/{spec.label}/dice")
        if dice is None or math.isnan(dice):
            lines.append(f"the external test set '{spec.label}' was not measured (test/{spec.label}/dice is "
                         f"{'missing' if dice is None else 'NaN'}): check that its masks hold lesions with "
                         f"`meddiffaug data inspect`.")
    return lines
