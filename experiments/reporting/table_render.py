"""Markdown rendering of the tables built by :mod:`experiments.reporting.table`.

Cells are ``mean ± std [95 % CI]`` over seeds; Δ cells are paired-by-seed differences with their
CI and number of pairs; collapsed segmenter runs and untrustworthy gates are marked in the cell
and explained in footnotes, so nothing is averaged away silently.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from experiments.reporting.stats import fmt

SEG_PREFIXES = ("test/", "val/")  # metrics a collapsed segmenter corrupts
GATE_METRIC, COLLAPSE_METRIC = "gen/real_pass_rate", "seg/collapsed"
# a gate must also reject real pairs made wrong; one that passes them judges nothing
GATE_REJECT_METRICS = ("gen/real_misplaced_reject_rate", "gen/real_missing_reject_rate")


def render_markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right)."""
    clean = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _cell(summary: Dict[str, float], col: Dict[str, Any], collapsed: int, best: bool,
          n_runs: int) -> str:
    spec = col.get("format", ".3f")
    if not summary["n"]:
        return "not logged" if n_runs else "no runs yet"
    text = fmt(summary["mean"], spec)
    text = f"**{text}**" if best else text
    if summary["n"] >= 2:
        text += f" ± {fmt(summary['std'], spec)}"
        if col.get("ci"):
            text += f" [{fmt(summary['ci95_low'], spec)}, {fmt(summary['ci95_high'], spec)}]"
    else:
        text += " (n=1)"
    if collapsed and col["metric"].startswith(SEG_PREFIXES):
        text += f" ({collapsed} collapsed)"
    return text


def _diff_cell(diff: Optional[Dict[str, Any]], col: Dict[str, Any], is_base: bool) -> str:
    if is_base:
        return "reference"
    if diff is None or not diff["n"]:
        return "no paired seeds"
    spec = col.get("format", ".3f")
    text = fmt(diff["mean"], spec, signed=True)
    if diff["n"] < 2:
        return f"{text} (n=1 pair; CI undefined)"
    low, high = diff["ci95_low"], diff["ci95_high"]
    if low > 0 or high < 0:  # the CI excludes zero: mark whether that is good news
        good = (low > 0) == bool(col.get("higher_is_better", True))
        text = f"**{text}** {'▲' if good else '▼'}"
    return f"{text} [{fmt(low, spec, True)}, {fmt(high, spec, True)}] (n={diff['n']})"


def render_section(spec: Dict[str, Any], table: Dict[str, Any], plot: Optional[str] = None,
                   samples: Optional[str] = None) -> str:
    """One ``results.md`` section: title, command, table, seeds, footnotes (and a figure).

    Args:
        spec: the table spec (columns, baselines, compare metrics, gate threshold).
        table: the output of :func:`experiments.reporting.table.build_table`.
        plot: file name of the table's figure, relative to ``results.md``, if any.
        samples: file name of a real-vs-generated sample grid, relative to ``results.md``, if any.

    Returns:
        Markdown text ending in a blank line.
    """
    out = [f"## {table['title']}", "", f"Filled by: `{table['command']}`", ""]
    cols = spec["columns"]
    by_metric = {c["metric"]: c for c in cols}
    header = [spec["rows"]["header"]] + [c.get("name", c["metric"]) for c in cols] + ["n"]
    for name in table["baseline_names"]:
        header += [f"Δ {by_metric.get(m, {'name': m}).get('name', m)} vs {name} (paired, 95 % CI)"
                   for m in spec["compare"]]
    body, notes = [], []
    if not table["n_runs"]:
        out += [f"No runs yet: run `{table['command']}`.", ""]
    else:
        best = {}
        for c in cols:
            means = [r["metrics"][c["metric"]]["mean"] for r in table["rows"] if r["n"]]
            means = [m for m in means if m == m]
            top = (max(means) if c.get("higher_is_better") else min(means)) if means else None
            if len(means) > 1 and c.get("higher_is_better") is not None and means.count(top) == 1:
                best[c["metric"]] = top  # bold a unique best only: a tie singles out nothing
        for r in table["rows"]:
            label = ("⚠ " if r["gate_warning"] else "") + r["label"]
            cells = [_cell(r["metrics"][c["metric"]], c, r["collapsed"],
                           best.get(c["metric"]) == r["metrics"][c["metric"]]["mean"], r["n"])
                     for c in cols]
            diffs = [_diff_cell(v["diff"][m], by_metric.get(m, {}), v["is_baseline"])
                     for v in r.get("vs", []) for m in spec["compare"]]
            body.append([label] + cells + [str(r["n"])] + diffs)
            if r["gate_warning"]:
                rate = r["metrics"][GATE_METRIC]["mean"]
                if rate < spec.get("gate_min_real_pass", 0.8):
                    notes.append(f"⚠ {r['label']}: gate passes only {rate * 100:.0f} % of real validation "
                                 f"pairs (mean `{GATE_METRIC}` < {spec.get('gate_min_real_pass', 0.8):.2f}); "
                                 "its verdicts on synthetic pairs are not trustworthy.")
                else:
                    rejects = ", ".join(f"{r['metrics'][m]['mean'] * 100:.0f} % of {m.split('_')[1]}"
                                        for m in GATE_REJECT_METRICS)
                    notes.append(f"⚠ {r['label']}: gate rejects only {rejects} real lesions (mean < "
                                 f"{spec.get('gate_min_real_reject', 0.5):.2f}); it passes wrong pairs too.")
        if any(r["collapsed"] for r in table["rows"]):
            notes.append("collapsed: a run whose best validation Dice stayed under "
                         "`segmenter.collapse_dice`; such runs are included in the mean and counted.")
        if table["pooled"]:
            notes.append("Some rows hold several cells per seed (an axis not fixed by the "
                         "table's filter); they are averaged per seed before pairing.")
    for p in table["pending"]:
        body.append([f"{p['dataset']} (pending)", f"pending: {p.get('needs', '')}; run `{p['command']}`"]
                    + ["pending"] * (len(header) - 2))
    if body:
        out += [render_markdown_table(header, body), ""]
    seeds = sorted({s for r in table["rows"] for s in r["seeds"]}, key=lambda s: (len(s), s))
    if table["n_runs"]:
        ns = sorted({r["n"] for r in table["rows"] if r["n"]})
        n_text = str(ns[0]) if ns[0] == ns[-1] else f"{ns[0]}–{ns[-1]}"
        out += [f"n = {n_text} seeds per row (seeds {', '.join(seeds)}); cells are mean ± std over seeds"
                + (", [95 % t-CI]" if any(c.get("ci") for c in cols) else "")
                + ("; Δ columns are paired by seed (mean difference, 95 % t-CI, number of pairs); "
                   "**bold** Δ: the CI excludes 0 (▲ better, ▼ worse)" if spec["baselines"] else "")
                + ".", ""]
    notes += [spec["notes"]] if spec.get("notes") else []
    out += [f"{i}. {n}" for i, n in enumerate(notes, 1)] + ([""] if notes else [])
    if plot:
        out += [f"![{table['title']}]({plot})", ""]
    if samples:
        out += [f"Real sources and generated pairs ({', '.join(f'{k}={v}' for k, v in spec['samples'].items())}, "
                "lowest seed; columns: source | mask | generated | overlay):", "",
                f"![real vs generated samples]({samples})", ""]
    return "\n".join(out)
