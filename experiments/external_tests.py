"""``data.external_tests``: test sets from elsewhere, evaluated with the selected checkpoint.

Each entry is a mapping: a registered dataset at its own root (``{name: cvc_clinicdb, root: …}``),
a ``folder`` (``{name: folder, root: …, classes: […]}``) or a procedural kind's second center
(``{name: procedural_polyp, center: b}``, ``n`` pairs, default ``data.test_pool``). ``label``
names the set in metric keys (``test/<label>/dice``; default the dataset name, ``<name>_center_b``
or ``folder_<folder name>``). The sets are loaded beside the run's datamodule, never inside it, so
their pairs enter no training, validation, calibration or selection; a set holding one of the run's
own images is an error. Only the segment stage reads them, so only its signature holds them, and
only when the list is not empty (committed runs keep their signatures).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.errors import DataError, did_you_mean

ENTRY_KEYS = ("name", "root", "center", "n", "label", "classes")
_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")
_EXAMPLE = "{name: procedural_polyp, center: b} or {name: cvc_clinicdb, root: /data/CVC-ClinicDB}"


@dataclass(frozen=True)
class ExternalSpec:
    """One resolved entry of ``data.external_tests``."""

    label: str
    name: str
    root: Optional[str] = None
    center: Optional[str] = None
    n: Optional[int] = None
    layout: Dict[str, Any] = field(default_factory=dict)  # layout options (folder's classes)


def _entries(cfg: DictConfig) -> list:
    entries = OmegaConf.select(cfg, "data.external_tests", default=None)
    if entries is None:
        return []
    return OmegaConf.to_container(entries, resolve=True) if OmegaConf.is_config(entries) else list(entries)


def external_specs(cfg: DictConfig, error: Any = ValueError) -> List[ExternalSpec]:
    """Check and resolve ``data.external_tests``; raise ``error(message)`` naming the entry and key.

    Args:
        cfg: the run's config.
        error: the exception class to raise (``ConfigError`` when loading a config).
    """
    from datamodules import DATASETS

    specs: List[ExternalSpec] = []
    for k, entry in enumerate(_entries(cfg)):
        where = f"data.external_tests[{k}]"
        if not isinstance(entry, dict):
            raise error(f"'{where}' is {entry!r}; give a mapping such as {_EXAMPLE}.")
        for key in entry:
            if key not in ENTRY_KEYS:
                raise error(f"'{where}' has an unknown key '{key}'.{did_you_mean(str(key), list(ENTRY_KEYS))} "
                            f"Valid keys: {', '.join(ENTRY_KEYS)}.")
        name = entry.get("name")
        if name not in DATASETS:
            raise error(f"'{where}.name' is {name!r}; name a registered dataset "
                        f"({', '.join(sorted(DATASETS))}), e.g. {_EXAMPLE}.")
        specs.append(_spec(cfg, entry, str(name), where, error))
    labels = [s.label for s in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise error(f"two entries of 'data.external_tests' are both labelled '{label}'; give each a "
                        f"distinct 'label' (it names the metrics test/<label>/dice).")
    return specs


def _spec(cfg: DictConfig, entry: dict, name: str, where: str, error: Any) -> ExternalSpec:
    procedural = name.startswith("procedural_")
    if procedural:
        if entry.get("center") != "b":
            raise error(f"'{where}.center' is {entry.get('center')!r}; a procedural external set is a "
                        f"second center: set center: b (center A is the run's own test split).")
        if entry.get("root") is not None or entry.get("classes") is not None:
            raise error(f"'{where}': {name} is rendered, not read: remove root and classes.")
        n = entry.get("n", cfg.data.test_pool)
        if n is None:  # no test pool: as many pairs as the test split of the run's own content
            n = max(1, round(float(cfg.data.test_fraction) * int(cfg.data.n_procedural)))
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise error(f"'{where}.n' is {n!r}; give the center-B pool size, an integer >= 1.")
        label = entry.get("label") or f"{name}_center_b"
        spec = ExternalSpec(str(label), name, center="b", n=int(n))
    else:
        if entry.get("root") in (None, ""):
            raise error(f"'{where}': dataset {name} needs root: the folder holding it.")
        if entry.get("center") is not None or entry.get("n") is not None:
            raise error(f"'{where}': center and n are for procedural datasets; {name} is read whole from its root.")
        if entry.get("classes") is not None and name != "folder":
            raise error(f"'{where}.classes' is for name: folder; {name} knows its classes.")
        default = f"folder_{Path(str(entry['root'])).name}" if name == "folder" else name
        label = entry.get("label") or re.sub(r"[^A-Za-z0-9_.-]", "_", default)
        layout = {"classes": list(entry["classes"])} if entry.get("classes") is not None else {}
        spec = ExternalSpec(str(label), name, root=str(entry["root"]), layout=layout)
    if not _LABEL.match(spec.label):
        raise error(f"'{where}.label' is {spec.label!r}; use letters, digits, '_', '.' or '-' (it names "
                    f"the metrics test/<label>/dice).")
    return spec


def signature_inputs(cfg: DictConfig) -> Dict[str, Any]:
    """The segment stage's extra inputs: ``{}`` without external sets (old signatures stay valid).

    A root enters by content (as ``data.root`` does), so another mount of the same files reuses the stage.
    """
    from experiments.data_identity import folder_identity

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


def evaluate_external(trainer: Any, module: Any, sets: list, ckpt_path: Optional[str], batch_size: int,
                      workdir: Path) -> Dict[str, float]:
    """Test the selected checkpoint on each external set: ``test/<label>/<metric>`` floats.

    The metrics are the in-domain test's (the segmenter's torchmetrics, under another prefix); a
    prediction grid of each set is written to ``workdir/predictions_<label>.png``.
    """
    from torch.utils.data import DataLoader

    from experiments.stages.segment import save_prediction_figure

    metrics: Dict[str, float] = {}
    for ext in sets:
        prefix = f"test/{ext.label}"
        module.test_prefix = prefix
        try:
            loader = DataLoader(ext.dataset(), batch_size=batch_size, shuffle=False)
            trainer.test(module, dataloaders=loader, ckpt_path=ckpt_path, verbose=False)
        finally:
            module.test_prefix = "test"
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix + "/")})
        if trainer.is_global_zero:
            save_prediction_figure(module, ext.dataset(), Path(workdir) / f"predictions_{ext.label}.png")
    return metrics


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
