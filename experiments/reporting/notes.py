"""Table notes whose numbers come from the aggregated results, never typed by hand.

A note in a table YAML is a ``str.format`` template over the table it sits under, e.g.::

    notes: >-
      Diffusion gains {diff.dice.synthetic_filtered.real_only.mean:+.3f}
      {diff.dice.synthetic_filtered.real_only.ci:+.3f} over real only
      ({diff.dice.synthetic_filtered.real_only.holm}); real only scores {dice.real_only.mean:.3f}.

Names: a metric by its last part (``dice`` for ``test/dice``, ``fnr_small``, ``accept_rate``) or
in full (``metric[test/dice]``), then a row key (``real_only``; ``[0.7]`` for keys that are
not names; ``[Unet/augmented]`` for composite rows), then ``mean std ci95_low ci95_high n ci``.
``diff.<metric>.<row>.<baseline row>`` is a paired Δ with ``mean ci ci95_low ci95_high n p
p_holm mde80 side`` (above 0 / below 0 / includes 0) and ``holm`` (significant or not after
Holm). ``n_seeds`` and ``seeds`` describe the table; summary tables add their own sentences (e.g.
``{exchange}``). A missing number prints ``n/a``; an unknown name is an error naming the table.
Literal braces are written ``{{`` and ``}}``.
"""
from __future__ import annotations

import itertools
import math
import string
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from experiments.config import ConfigError
from experiments.reporting.keys import canon
from experiments.reporting.stats import stable

BASE_NAMES = {"diff", "metric", "n_seeds", "seeds"}


class Num:
    """A number that formats like a float and prints ``n/a`` when missing (None/NaN)."""

    def __init__(self, value: Any):
        self.value = None if value is None or not math.isfinite(float(value)) else stable(float(value))

    def __format__(self, spec: str) -> str:
        if self.value is None:
            return "n/a"
        return format(self.value, spec or ".3f")

    def __str__(self) -> str:
        return format(self, "")


class Interval:
    """``[low, high]``, each part formatted with the placeholder's format spec."""

    def __init__(self, low: Any, high: Any):
        self.low, self.high = Num(low), Num(high)

    def __format__(self, spec: str) -> str:
        return f"[{format(self.low, spec)}, {format(self.high, spec)}]"


class Node:
    """Attribute and index access over a dict, with an error that names what exists."""

    def __init__(self, items: Mapping[str, Any], what: str):
        self._items, self._what = dict(items), what

    def _get(self, key: Any) -> Any:
        key = canon(key)
        if key not in self._items:
            raise KeyError(f"{self._what} has no '{key}' (has: {', '.join(self._items) or 'nothing'})")
        return self._items[key]

    __getitem__ = _get

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        return self._get(key)


def _summary(s: Mapping[str, Any]) -> Node:
    return Node({"mean": Num(s.get("mean")), "std": Num(s.get("std")), "ci95_low": Num(s.get("ci95_low")),
                  "ci95_high": Num(s.get("ci95_high")), "n": s.get("n", 0),
                  "ci": Interval(s.get("ci95_low"), s.get("ci95_high"))}, "a summary")


def _diff(d: Optional[Mapping[str, Any]]) -> Node:
    d = d or {"n": 0}
    low, high = d.get("ci95_low"), d.get("ci95_high")
    finite = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
    side = ("above 0" if low > 0 else "below 0" if high < 0 else "includes 0") if finite else "undefined"
    p_holm = d.get("p_holm")
    holm = ("significant after Holm" if d.get("significant") else "not significant after Holm"
            if p_holm is not None and math.isfinite(p_holm) else "not tested")
    node = _summary(d)
    node._items.update({"p": Num(d.get("p")), "p_holm": Num(p_holm), "mde80": Num(d.get("mde80")),
                        "side": side, "holm": holm})
    return node


def metric_alias(metric: str, metrics: Iterable[str]) -> Optional[str]:
    """``dice`` for ``test/dice`` when no other metric of the table ends in ``dice``."""
    short = metric.split("/")[-1]
    return short if sum(m.split("/")[-1] == short for m in metrics) == 1 else None


def declared_keys(spec: Mapping[str, Any]) -> List[str]:
    """Row keys a table spec declares (``rows.order`` and ``rows.names``): a note may quote them
    before their runs exist (they print ``n/a``); any other unknown row is a typo."""
    per_key = []
    for by in spec["rows"]["by"]:
        values = list(spec["rows"]["order"].get(by) or []) + list((spec["rows"]["names"].get(by) or {}).keys())
        per_key.append(list(dict.fromkeys(canon(v) for v in values)))
    return ["/".join(parts) for parts in itertools.product(*per_key)]


def context(table: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None,
            declared: Sequence[str] = ()) -> Dict[str, Any]:
    """The names a note may use (see the module docstring) for one built table."""
    rows = [r for r in table["rows"]]
    metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
    key = lambda r: "/".join(r["key"])  # noqa: E731
    empty = {"n": 0}
    by_metric = {m: Node({**{k: _summary(empty) for k in declared}, **{key(r): _summary(r["metrics"][m]) for r in rows}},
                          f"metric {m}") for m in metrics}
    diffs: Dict[str, Dict[str, Dict[str, Node]]] = {}
    bases = {vs["baseline_key"] for r in rows for vs in r.get("vs", [])}
    for m in {m for r in rows for vs in r.get("vs", []) for m in vs["diff"]}:
        for k in declared:
            diffs.setdefault(m, {})[k] = {b: _diff(None) for b in bases}
    for r in rows:
        for vs in r.get("vs", []):
            for m, d in vs["diff"].items():
                if vs.get("baseline_key") is not None:
                    diffs.setdefault(m, {}).setdefault(key(r), {})[vs["baseline_key"]] = _diff(d if d else None)
    diff_node = {m: Node({k: Node(v, f"Δ {m} of row {k}") for k, v in per_row.items()}, f"Δ {m}")
                 for m, per_row in diffs.items()}
    seeds = sorted({s for r in rows for s in r["seeds"]}, key=lambda s: (len(s), s))
    ctx: Dict[str, Any] = {"metric": Node(by_metric, "metric"), "n_seeds": len(seeds), "seeds": ", ".join(seeds)}
    diff_items = dict(diff_node)
    for m in metrics:
        alias = metric_alias(m, metrics)
        if alias:
            ctx.setdefault(alias, by_metric[m])
            if m in diff_node:
                diff_items.setdefault(alias, diff_node[m])
    ctx["diff"] = Node(diff_items, "diff")
    ctx.update(extra or {})
    return ctx


def field_roots(template: str) -> set:
    """The first name of every placeholder of a template (``dice`` of ``{dice.real_only.mean}``)."""
    roots = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            roots.add(name.split(".")[0].split("[")[0])
    return roots


def render(template: Optional[str], table: Mapping[str, Any], source: str,
           extra: Optional[Mapping[str, Any]] = None, declared: Sequence[str] = ()) -> Optional[str]:
    """Fill a note template from a built table.

    Raises:
        ConfigError: a placeholder names something the table does not have (the message names the
            table file, the placeholder and what exists).
    """
    if not template:
        return None
    try:
        return template.format_map(context(table, extra, declared))
    except (KeyError, AttributeError, IndexError, ValueError) as err:
        message = err.args[0] if err.args else err
        raise ConfigError(f"{source}: a placeholder in 'notes' does not resolve: {message}. Placeholders name "
                          f"table numbers, e.g. {{dice.real_only.mean:.3f}} (see experiments/reporting/notes.py); "
                          f"write literal braces as {{{{ }}}}.") from None
