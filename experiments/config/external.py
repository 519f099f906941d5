"""``data.external_tests`` as config: each entry checked and resolved to an :class:`ExternalSpec`.

Each entry is a mapping: a registered dataset at its own root (``{name: cvc_clinicdb, root: …}``),
a ``folder`` (``{name: folder, root: …, classes: […]}``) or a procedural kind's second center
(``{name: procedural_polyp, center: b}``, ``n`` pairs, default ``data.test_pool``). ``label``
names the set in metric keys (``test/<label>/dice``; default the dataset name, ``<name>_center_b``
or ``folder_<folder name>``). Loading and evaluating them: :mod:`experiments.runner.external_tests`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from datamodules.errors import did_you_mean

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
