"""Markdown rendering of the tables built by :mod:`experiments.reporting.table`.

Cells are ``mean ± std [95 % CI]`` over seeds; Δ cells are paired-by-seed differences with their
CI and number of pairs; collapsed segmenter runs and untrustworthy gates are marked in the cell
and explained in footnotes, so nothing is averaged away silently.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from experiments.reporting.keys import EXTERNAL_PREFIX, GATE_METRIC, GATE_REJECT_METRICS, SEG_PREFIXES
from experiments.reporting.notes import Interval, Node, Num, declared_keys, render
from experiments.reporting.stats import fmt

def render_markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right)."""
    clean = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _cell(summary: Dict[str, float], col: Dict[str, Any], collapsed: int, n_runs: int) -> str:
    # No "best mean" is bolded: an untested ranking of means would look like a finding.
    spec = col.get("format", ".3f")
    if not summary["n"]:
        return ("not measured" if col["metric"].startswith(EXTERNAL_PREFIX) else "not logged") if n_runs else "no runs yet"
    text = fmt(summary["mean"], spec)
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
        return "not measured" if str(col.get("metric", "")).startswith(EXTERNAL_PREFIX) else "no paired seeds"
    spec = col.get("format", ".3f")
    text = fmt(diff["mean"], spec, signed=True)
    if diff["n"] < 2:
        return f"{text} (n=1 pair; CI undefined)"
    low, high = diff["ci95_low"], diff["ci95_high"]
    if diff.get("significant"):  # Holm-corrected within the table, not the raw CI
        good = (diff["mean"] > 0) == bool(col.get("higher_is_better", True))
        text = f"**{text}** {'▲' if good else '▼'}"
    mde = f"; MDE {fmt(diff['mde80'], spec)}" if diff.get("mde80") is not None else ""
    return f"{text} [{fmt(low, spec, True)}, {fmt(high, spec, True)}] (n={diff['n']}{mde})"


VALIDATOR_NAMES = {"prompted": "prompted (this suite)", "plain": "plain (DiffAug)",
                   "features": "UNet decoder features", "mixed": "mixed", None: "—"}


def render_section(spec: Dict[str, Any], table: Dict[str, Any], plot: Optional[str] = None,
                   samples: Optional[str] = None, extra: Optional[Dict[str, Any]] = None) -> str:
    """One ``results.md`` section: title, command, table, seeds, footnotes (and a figure).

    Args:
        spec: the table spec (columns, baselines, compare metrics, gate threshold).
        table: the output of :func:`experiments.reporting.table.build_table`.
        plot: file name of the table's figure, relative to ``results.md``, if any.
        samples: file name of a real-vs-generated sample grid, relative to ``results.md``, if any.
        extra: a summary block (:mod:`experiments.reporting.summaries`): its Markdown goes under the
            table, its pending rows into it, its names into the note template.

    Returns:
        Markdown text ending in a blank line.
    """
    out = [f"## {table['title']}", "", f"Filled by: `{table['command']}`", ""]
    cols = spec["columns"]
    by_metric = {c["metric"]: c for c in cols}
    extra = extra or {}
    validators = any(r.get("validator") for r in table["rows"])  # rows name the latent validator they use
    header = ([spec["rows"]["header"]] + (["Validator"] if validators else [])
              + [c.get("name", c["metric"]) for c in cols] + ["n"])
    for name in table["baseline_names"]:
        header += [f"Δ {by_metric.get(m, {'name': m}).get('name', m)} vs {name} (paired, 95 % CI)"
                   for m in spec["compare"]]
    body, notes = [], []
    if not table["n_runs"]:
        out += [f"No runs yet: run `{table['command']}`.", ""]
    else:
        for r in table["rows"]:
            label = ("⚠ " if r["gate_warning"] else "") + r["label"]
            cells = [_cell(r["metrics"][c["metric"]], c, r["collapsed"], r["n"]) for c in cols]
            diffs = [_diff_cell(v["diff"][m], by_metric.get(m, {}), v["is_baseline"])
                     for v in r.get("vs", []) for m in spec["compare"]]
            n_text = str(r["n"]) + (f" (+{r['no_accept']} accepted none)" if r.get("no_accept") else "")
            body.append([label] + ([VALIDATOR_NAMES[r.get("validator")]] if validators else [])
                        + cells + [n_text] + diffs)
            notes += gate_notes(r, spec) + thin_run_notes(r, spec)
        if any(r["collapsed"] for r in table["rows"]):
            notes.append("collapsed: a run whose best validation Dice stayed under "
                         "`segmenter.collapse_dice`; such runs are included in the mean and counted.")
        if table["pooled"]:
            notes.append("Some rows hold several cells per seed (an axis not fixed by the "
                         "table's filter); they are averaged per seed before pairing.")
    for p in list(table["pending"]) + list(extra.get("pending") or []):
        body.append([f"{p['dataset']} (pending)", f"pending: {p.get('needs', '')}; run `{p['command']}`"]
                    + ["pending"] * (len(header) - 2))
    if body:
        out += [render_markdown_table(header, body), ""]
    if table["n_runs"]:
        out += [seed_line(spec, table), ""]
    out += list(extra.get("markdown") or [])
    if table["n_runs"] and spec.get("notes"):  # numbers in notes come from the table, never typed
        notes.append(render(spec["notes"], table, spec.get("path", spec["id"]), _names(extra.get("notes")),
                            declared_keys(spec)))
    out += [f"{i}. {n}" for i, n in enumerate(notes, 1)] + ([""] if notes else [])
    if plot:
        out += [f"![{table['title']}]({plot})", ""]
    if samples:
        out += [f"Real sources and generated pairs ({', '.join(f'{k}={v}' for k, v in spec['samples'].items())}, "
                "lowest seed; columns: source | mask | generated | overlay):", "",
                f"![real vs generated samples]({samples})", ""]
    return "\n".join(out)


def seed_line(spec: Dict[str, Any], table: Dict[str, Any]) -> str:
    """The sentence under a table: seeds per row, what a cell holds, what a Δ cell and bold mean."""
    seeds = sorted({s for r in table["rows"] for s in r["seeds"]}, key=lambda s: (len(s), s))
    ns = sorted({r["n"] for r in table["rows"] if r["n"]})
    n_text = str(ns[0]) if ns[0] == ns[-1] else f"{ns[0]}–{ns[-1]}"
    family = table.get("holm_family", 0)
    return (f"n = {n_text} seeds per row (seeds {', '.join(seeds)}); cells are mean ± std over seeds"
            + (", [95 % t-CI]" if any(c.get("ci") for c in spec["columns"]) else "")
            + ("; Δ columns are paired by seed (mean difference, unadjusted 95 % t-CI, number of pairs, "
               "MDE: the smallest true Δ a paired t-test finds with 80 % power, from the observed paired SD, "
               f"at two-sided α = 0.05/{family}, Holm's strictest step); **bold** Δ: "
               f"significant after Holm's correction over the {family} paired comparisons "
               "of this table (paired t-tests, family-wise α = 0.05; ▲ better, ▼ worse)" if spec["baselines"] else "")
            + ".")


def gate_notes(row: Dict[str, Any], spec: Dict[str, Any]) -> list:
    """The ⚠ footnote of a row whose gate is flagged: which rate fell short of the spec's threshold."""
    if not row["gate_warning"]:
        return []
    rate = row["metrics"][GATE_METRIC]["mean"]
    if rate < spec["gate_min_real_pass"]:
        # fractions in the columns' own format, so a note never disagrees with its cell by rounding
        folds = row.get("gate_crossfit_folds")
        pairs = (f"on all labelled real lesion pairs, cross-fitted in {folds} folds" if folds
                 else "on real validation lesion pairs")
        return [f"⚠ {row['label']}: the gate's real pass rate is only {fmt(rate, '.2f')} (mean "
                f"`{GATE_METRIC}` {pairs} < {spec['gate_min_real_pass']:.2f}); "
                "its verdicts on synthetic pairs are not trustworthy."]
    rejects = ", ".join(f"{fmt(row['metrics'][m]['mean'], '.2f')} ({m.split('_')[1]})" for m in GATE_REJECT_METRICS)
    return [f"⚠ {row['label']}: the gate's reject rates on real lesions made wrong are only {rejects} (mean < "
            f"{spec['gate_min_real_reject']:.2f}); it passes wrong pairs too."]


def thin_run_notes(row: Dict[str, Any], spec: Dict[str, Any]) -> list:
    """Footnotes for a row's thin gate runs: those that accepted no pair (left out, with the row's
    numbers had they been counted) and those that drew their synthetic pairs with replacement."""
    notes = []
    if row.get("no_accept"):
        everything = row["all_runs"]
        dice = everything["metrics"].get("test/dice", {"n": 0})
        sensitivity = "; ".join(
            f"Δ Dice vs {vs['baseline']} {fmt(d['mean'], '.3f', True)} [{fmt(d['ci95_low'], '.3f', True)}, "
            f"{fmt(d['ci95_high'], '.3f', True)}] (n={d['n']})"
            for vs in everything.get("vs", []) if (d := vs["diff"].get("test/dice")) and d["n"])
        runs = f"{row['no_accept']} run" + ("" if row["no_accept"] == 1 else "s")
        notes.append(f"{row['label']}: {runs} accepted no synthetic pair (seed "
                     f"{', '.join(row['seeds_no_accept'])}); such a run trained on real pairs alone, so it is not a "
                     "result of this arm and is left out of the row's segmentation numbers and Δs (the gate's own "
                     "rates count it). Counted in, the row's Dice would be "
                     f"{fmt(dice.get('mean'))} over {dice['n']} runs" + (f"; {sensitivity}" if sensitivity else "") + ".")
    if row.get("with_replacement"):
        counts = ", ".join(str(a) for a, _ in row["with_replacement"])
        drawn = sorted({d for _, d in row["with_replacement"]})
        count = len(row["with_replacement"])
        notes.append(f"{row['label']}: {count} run{'' if count == 1 else 's'} accepted fewer synthetic pairs than "
                     f"they draw ({counts} accepted; {', '.join(map(str, drawn))} drawn, augment.ratio × training pairs): "
                     "their synthetic pairs were drawn with replacement, so few distinct pairs repeat.")
    return notes


def _names(values: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Summary values for the note template: dicts become attribute nodes, numbers format like floats."""
    def wrap(value: Any, what: str) -> Any:
        if isinstance(value, dict):
            return Node({str(k): wrap(v, f"{what}.{k}") for k, v in value.items()}, what)
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float, type(None))) for v in value):
            return Interval(*value)
        if isinstance(value, float) or value is None:
            return Num(value)
        return value

    return {k: wrap(v, k) for k, v in (values or {}).items()}
