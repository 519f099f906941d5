"""Table specs (``experiments/tables/*.yaml``): read, normalised and checked before any run is read.

A table is data: which grid's runs to read, how to group them into rows, which metrics to show,
which row every other row is compared with (paired by seed), and which rows are *pending* (real
datasets that need a GPU and a data folder; they show the command that fills them, never a number
no run produced).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from experiments.config import ConfigError
from experiments.reporting import notes as note_tpl
from experiments.reporting.keys import COLLAPSE_METRIC, GATE_METRIC, GATE_REJECT_METRICS
from lightning_modules.gating.flags import MIN_REAL_PASS, MIN_WRONG_REJECT

SPEC_KEYS = {"title", "grid", "grids", "grid_key", "command", "rows", "columns", "baseline", "compare", "filter",
             "pending", "plot", "headline", "headline_rows", "dataset", "n_real", "notes", "note_metrics",
             "gate_min_real_pass", "gate_min_real_reject", "samples", "summary", "efficiency", "external",
             "primary", "preregistration", "amendments"}
SUMMARIES = {"headline_by_modality": {"by_modality"}, "data_efficiency": {"exchange"}}  # their note names

def load_table(path: str | Path) -> Dict[str, Any]:
    """Read and normalise a table YAML; unknown keys and unknown note names are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Table file '{path}' does not exist; see experiments/tables/*.yaml.")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown or not ("grid" in spec or "grids" in spec) or "columns" not in spec:
        raise ConfigError(f"{path}: unknown keys {unknown} or missing 'grid' (or 'grids')/'columns'; "
                          f"valid keys: {', '.join(sorted(SPEC_KEYS))}.")
    if spec.get("summary") is not None and spec["summary"] not in SUMMARIES:
        raise ConfigError(f"{path}: summary '{spec['summary']}' is unknown; use one of {', '.join(SUMMARIES)}.")
    grids = spec.get("grids")  # {label: grid}: one table over several grids, e.g. one per modality
    spec["sources"] = [(str(k), str(v)) for k, v in grids.items()] if grids else [(None, str(spec["grid"]))]
    spec.setdefault("grid", ", ".join(g for _, g in spec["sources"]))
    rows = spec.get("rows") or {"by": "variant"}
    rows = {"by": rows} if isinstance(rows, str) else dict(rows)
    by = [rows["by"]] if isinstance(rows["by"], str) else list(rows["by"])
    single = len(by) == 1  # order/names may be given flat for one key, per key otherwise
    rows["by"] = by
    rows["order"] = {by[0]: rows.get("order") or []} if single else rows.get("order") or {}
    rows["names"] = {by[0]: rows.get("names") or {}} if single else rows.get("names") or {}
    rows.setdefault("header", by[0].split(".")[-1] if single else " · ".join(b.split(".")[-1] for b in by))
    spec["rows"] = rows
    spec["columns"] = [{"metric": c, "name": c} if isinstance(c, str) else dict(c)
                       for c in spec["columns"]]
    base = spec.get("baseline")
    base = [] if base is None else base if isinstance(base, list) else [base]
    spec["baselines"] = [b if isinstance(b, dict) else {by[-1]: b} for b in base]
    spec["compare"] = spec.get("compare") or [spec["columns"][0]["metric"]]
    spec.setdefault("title", spec["grid"])
    grid_cmd = " && ".join(f"meddiffaug grid sweeps/grids/{g}.yaml" for _, g in spec["sources"])
    spec.setdefault("command", f"{grid_cmd} && meddiffaug table {path} --write outputs/{path.stem}.md")
    spec["id"], spec["path"] = path.stem, str(path)
    _check_external(spec)
    amendments = spec.get("amendments")
    if amendments is not None and not (isinstance(amendments, list) and all(isinstance(a, str) for a in amendments)):
        raise ConfigError(f"{path}: 'amendments' is {amendments!r}; give a list of file paths "
                          f"(e.g. [sweeps/preregistration/block200_amendment1.md]).")
    # the validate stage flags a gate at these rates too (gen/gate_flagged); a table may be stricter
    spec.setdefault("gate_min_real_pass", MIN_REAL_PASS)
    spec.setdefault("gate_min_real_reject", MIN_WRONG_REJECT)
    _check_note_names(spec)
    return spec


def table_metrics(spec: Dict[str, Any]) -> List[str]:
    """Every metric a table aggregates: columns, compared, note-only, gate and collapse metrics."""
    return list(dict.fromkeys([c["metric"] for c in spec["columns"]] + spec["compare"]
                              + list(spec.get("note_metrics") or [])
                              + [GATE_METRIC, *GATE_REJECT_METRICS, COLLAPSE_METRIC]))


def _check_note_names(spec: Dict[str, Any]) -> None:
    metrics = table_metrics(spec)
    known = note_tpl.BASE_NAMES | {a for m in metrics if (a := note_tpl.metric_alias(m, metrics))}
    known |= SUMMARIES.get(spec.get("summary"), set())
    bad = sorted(note_tpl.field_roots(spec.get("notes") or "") - known)
    if bad:
        raise ConfigError(f"{spec['path']}: notes use unknown names {bad}; known: {', '.join(sorted(known))} "
                          f"(add a metric to note_metrics to quote it).")


def _check_external(spec: Dict[str, Any]) -> None:
    """``external``: the external test set whose metrics fill ``test/external/*`` columns: one set name
    (``procedural_polyp_center_b``), or a mapping from each grid label to its set."""
    external = spec.get("external")
    if external is None or isinstance(external, str):
        return
    labels = {label for label, _ in spec["sources"]}
    if not isinstance(external, dict) or set(map(str, external)) - labels:
        raise ConfigError(f"{spec['path']}: 'external' is {external!r}; give one set name (the label of "
                          f"data.external_tests, e.g. procedural_polyp_center_b) or map each grid label "
                          f"({', '.join(sorted(str(x) for x in labels))}) to its set.")
