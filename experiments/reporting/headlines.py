"""The one-line answers of ``results.json``: the main table's ``headline`` and ``headline_by_modality``,
and the sample picture copied next to ``results.md``."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

from experiments.reporting import findings
from experiments.reporting.stats import fmt, jsonable, paired_difference
from experiments.reporting.aggregate import mde_alpha
from experiments.reporting.keys import EXTERNAL_PREFIX, canon, column_of
from experiments.reporting.primary import primary_comparison, primary_markdown
from experiments.reporting.table_render import render_markdown_table

DICE, FNR = "test/dice", "test/fnr_small"
EXTERNAL_DICE = EXTERNAL_PREFIX + "dice"


def _find(table: Dict[str, Any], key: str, prefix: tuple = ()) -> Optional[dict]:
    want = list(prefix) + [canon(key)]
    return next((r for r in table["rows"] if r["key"] == want and r["n"]), None)


def _mean(row: Optional[dict], metric: str) -> Optional[float]:
    return row["metrics"][metric]["mean"] if row and metric in row["metrics"] else None


def _pair(a: Optional[dict], b: Optional[dict], alpha: float, metric: str = DICE) -> Optional[Dict[str, Any]]:
    if not (a and b and metric in a["by_seed"] and metric in b["by_seed"]):
        return None
    return paired_difference(a["by_seed"][metric], b["by_seed"][metric], mde_alpha=alpha)


def _ci(diff: Optional[Dict[str, Any]]) -> List[Optional[float]]:
    return [diff["ci95_low"], diff["ci95_high"]] if diff else [None, None]


def headline(spec: Dict[str, Any], table: Dict[str, Any], runs: pd.DataFrame) -> Dict[str, Any]:
    """The one-line answer: augmented vs real-only (and vs copy-paste), paired by seed, with the
    minimum detectable effect (80 % power) of each comparison."""
    names = spec.get("headline_rows") or {}
    real, aug, cp = (_find(table, names.get(role, role)) for role in ("real_only", "augmented", "copy_paste"))
    alpha = mde_alpha(table["holm_family"])
    gain, gain_cp, fnr = _pair(aug, real, alpha), _pair(aug, cp, alpha), _pair(aug, real, alpha, FNR)
    param = lambda k: runs[k].dropna().iloc[0] if k in runs and runs[k].notna().any() else None  # noqa: E731
    n_real = param("params.data.n_real") or spec.get("n_real")
    return jsonable({
        "table": spec["id"], "dataset": param("params.data.name") or spec.get("dataset"),
        "n_real": int(n_real) if str(n_real).isdigit() else n_real,
        "seeds": gain["n"] if gain else 0,
        "dice_real_only": _mean(real, DICE), "dice_augmented": _mean(aug, DICE),
        "gain": gain["mean"] if gain else None, "gain_ci95": _ci(gain),
        "mde80_vs_real_only": gain["mde80"] if gain else None,
        "small_lesion_fnr_real_only": _mean(real, FNR), "small_lesion_fnr_augmented": _mean(aug, FNR),
        "small_lesion_fnr_change": fnr["mean"] if fnr else None, "small_lesion_fnr_change_ci95": _ci(fnr),
        "dice_copy_paste": _mean(cp, DICE), "gain_vs_copy_paste": gain_cp["mean"] if gain_cp else None,
        "gain_vs_copy_paste_ci95": _ci(gain_cp), "mde80_vs_copy_paste": gain_cp["mde80"] if gain_cp else None,
        "mde80_alpha": alpha,
    })


def chosen_arm(choice: Any, table: Dict[str, Any], prefix: tuple = ()) -> str:
    """The arm a headline reports: a fixed variant, or ``{choose_by: <val metric>, among: [...]}``:
    the candidate with the best mean of that validation metric (higher is better), so the choice
    is fixed before the block and never reads a test metric."""
    if isinstance(choice, str):
        return choice
    metric = choice["choose_by"]
    if metric.startswith("test/"):
        raise ValueError(f"headline_rows chooses by {metric!r}: choose on validation metrics, never on test")
    # every run of the block, as the rule was fixed: runs left out of a row's means still count here
    scored = [(_mean(_all_runs(_find(table, arm, prefix)), metric), arm) for arm in choice["among"]]
    scored = [(value, arm) for value, arm in scored if value is not None]
    return max(scored)[1] if scored else choice["among"][0]


def _all_runs(row: Optional[dict]) -> Optional[dict]:
    return row.get("all_runs", row) if row else None


def _code(runs: pd.DataFrame, key: str, labels: List[str]) -> Tuple[Any, str]:
    """The commits the runs come from: ``(frozen_code, text)``. ``frozen_code`` is the one commit, or per
    modality its commit(s) when modalities differ (a block amended for one modality); the text warns
    when one modality's runs come from several commits, which a frozen block never has."""
    if "tags.git_sha" not in runs or f"tags.{key}" not in runs:
        shas = sorted(set(runs["tags.git_sha"].dropna())) if "tags.git_sha" in runs else []
        text = ", ".join(f"`{s}`" for s in shas) or "unknown"
        if len(shas) > 1:
            text += " ⚠ the runs come from several commits; a frozen block has one"
        return (shas[0] if len(shas) == 1 else shas or None), text
    by_label = {label: sorted(set(runs.loc[runs[f"tags.{key}"] == label, "tags.git_sha"].dropna()))
                for label in labels}
    by_label = {label: shas for label, shas in by_label.items() if shas}
    every = sorted({s for shas in by_label.values() for s in shas})
    if len(every) <= 1:
        return (every[0] if every else None), (f"`{every[0]}`" if every else "unknown")
    mixed = [label for label, shas in by_label.items() if len(shas) > 1]
    owners = {sha: [label for label, shas in by_label.items() if sha in shas] for sha in every}
    text = ", ".join(f"`{sha}` ({', '.join(owners[sha])})" for sha in every)
    if mixed:
        text += f" ⚠ the runs of {', '.join(mixed)} come from several commits; a frozen block has one per modality"
    return {label: shas[0] if len(shas) == 1 else shas for label, shas in by_label.items()}, text


def by_modality(spec: Dict[str, Any], table: Dict[str, Any], runs: pd.DataFrame) -> Dict[str, Any]:
    """``headline_by_modality``: per modality the seeds, the three headline arms' Dice, the paired gains
    with 95 % CIs and the MDE at 80 % power (and, under a fixed headline arm, the other arms' gains);
    ``frozen_code`` (the commit all runs share) and ``seed_block`` (the block's first seed) beside them.
    Also the Markdown summary and pending rows. Returns
        ``{"json": {...}, "markdown": [...], "pending": [...], "notes": {"by_modality": {...}}}``.
    """
    arms = {"real_only": "real_only", "copy_paste": "copy_paste", "diffusion": "diffusion_gate",
            **(spec.get("headline_rows") or {})}
    key = spec.get("grid_key", "group")
    alpha = mde_alpha(table["holm_family"])
    out: Dict[str, Any] = {}
    body, pending = [], []
    for label, grid in spec["sources"]:
        diffusion_arm = chosen_arm(arms["diffusion"], table, (canon(label),))
        real, cp, diff = (_find(table, arm, (canon(label),)) for arm in (arms["real_only"], arms["copy_paste"], diffusion_arm))
        gain, gain_cp = _pair(diff, real, alpha), _pair(diff, cp, alpha)
        mine = runs[runs[f"tags.{key}"] == label] if f"tags.{key}" in runs else runs.iloc[0:0]
        seeds = sorted({int(float(s)) for s in mine.get("tags.seed", pd.Series(dtype=object)).dropna()})
        entry = {"grid": grid, "seeds": seeds, "n_seeds": len(seeds),
                 "dice_real_only": _mean(real, DICE), "dice_copy_paste": _mean(cp, DICE),
                 "dice_diffusion": _mean(diff, DICE), "diffusion_arm": diffusion_arm,
                 "gain_vs_real_only": gain["mean"] if gain else None, "gain_vs_real_only_ci95": _ci(gain),
                 "gain_vs_copy_paste": gain_cp["mean"] if gain_cp else None,
                 "gain_vs_copy_paste_ci95": _ci(gain_cp),
                 "mde80_vs_real_only": gain["mde80"] if gain else None,
                 "mde80_vs_copy_paste": gain_cp["mde80"] if gain_cp else None, "mde80_alpha": alpha,
                 "pairs_vs_real_only": gain["n"] if gain else 0, "pairs_vs_copy_paste": gain_cp["n"] if gain_cp else 0,
                 "candidates": list(arms["diffusion"]["among"]) if isinstance(arms["diffusion"], dict) else [diffusion_arm],
                 "gate_flagged": bool(diff and diff["gate_warning"]), "excluded_no_accept": _excluded(diff, cp),
                 "significant_vs_real_only": _holm_significant(diff, arms["real_only"]),
                 "significant_vs_copy_paste": _holm_significant(diff, arms["copy_paste"])}
        # every arm's Dice in its own map: a flat dice_<arm> key would overwrite dice_diffusion (the
        # chosen arm) with the no-gate arm, whose variant is called "diffusion"
        entry["dice_by_arm"] = {r["key"][-1]: _mean(r, DICE) for r in table["rows"]
                                if r["key"][0] == canon(label) and r["n"]}
        if isinstance(arms["diffusion"], str):  # a fixed headline arm: the other arms' verdicts beside it
            entry["other_arms"] = _other_arms(table, label, arms, diffusion_arm, alpha)
        external = spec.get("external")
        external = external.get(label, None) if isinstance(external, dict) else external
        if external:
            entry["external"] = {str(external): _external(real, cp, diff, arms, alpha)}
        out[label] = entry
        if not len(mine):
            pending.append({"dataset": f"{label} ({grid})", "needs": "no runs yet",
                            "command": f"meddiffaug grid sweeps/grids/{grid}.yaml"})
            continue
        d = lambda x: fmt(x["mean"], ".3f", True) + " " + f"[{fmt(x['ci95_low'], '.3f', True)}, {fmt(x['ci95_high'], '.3f', True)}]" if x else "n/a"  # noqa: E731
        body.append([label, str(len(seeds)), fmt(entry["dice_real_only"]), fmt(entry["dice_copy_paste"]),
                     f"{fmt(entry['dice_diffusion'])} (`{diffusion_arm}`)", d(gain), d(gain_cp),
                     fmt(entry["mde80_vs_real_only"]), fmt(entry["mde80_vs_copy_paste"])])
    frozen, code = _code(runs, key, [label for label, _ in spec["sources"]])
    all_seeds = sorted({s for e in out.values() for s in e["seeds"]})
    block = all_seeds[0] if all_seeds else None
    out.update({"frozen_code": frozen, "seed_block": block})
    markdown = []
    if body:
        header = ["Modality", "seeds", "Dice real only", "Dice copy-paste", "Dice diffusion (arm)",
                  "Δ vs real only [95 % CI]", "Δ vs copy-paste [95 % CI]", "MDE80 vs real only", "MDE80 vs copy-paste"]
        markdown = [render_markdown_table(header, body), "",
                    f"Diffusion arm: {_describe(arms['diffusion'])}. Code: {code}"
                    + f"; seed block from {block}. MDE80: the smallest true paired Δ Dice found with 80 % power "
                      f"(paired t-test, the observed paired SD) at two-sided α = 0.05/{table['holm_family']} = "
                      f"{alpha:.2g}, Holm's strictest step over the table's {table['holm_family']} comparisons: the "
                      "level a Δ must reach to be bold.", ""]
    primary = primary_comparison(spec, table, [label for label, _ in spec["sources"]], _find)
    extra = {}
    if primary:  # the pre-registered comparison: per modality in its entry, the whole family beside
        for label, entry in primary["by_modality"].items():
            out[label]["primary"] = entry
        extra = {"primary": {k: v for k, v in primary.items() if k != "by_modality"},
                 "preregistration": spec.get("preregistration"),
                 **({"amendments": spec["amendments"]} if spec.get("amendments") else {})}
        markdown += primary_markdown(primary, spec.get("preregistration"), spec.get("amendments")) if body else []
    return {"json": {"headline_by_modality": out, "frozen_code": frozen, "seed_block": block, **extra},
            "markdown": markdown, "pending": pending, "notes": {"by_modality": out},
            "findings": findings.headline({k: v for k, v in out.items() if k in dict(spec["sources"])},
                                          table["holm_family"], primary)}


def _other_arms(table: Dict[str, Any], label: str, arms: Dict[str, Any], headline_arm: str,
                alpha: float) -> Dict[str, Any]:
    """Every other augmented arm of the modality against both controls (test Dice, paired by seed), with
    the table's Holm verdicts: what a fixed headline arm leaves out of the headline."""
    real, cp = (_find(table, arms[role], (canon(label),)) for role in ("real_only", "copy_paste"))
    skip = {canon(arms["real_only"]), canon(arms["copy_paste"]), canon(headline_arm)}
    out = {}
    for row in table["rows"]:
        if row["key"][0] != canon(label) or not row["n"] or row["key"][-1] in skip:
            continue
        out[row["key"][-1]] = {"dice": _mean(row, DICE), **_versus(row, real, cp, arms, alpha)}
    return out


def _versus(row: Optional[dict], real: Optional[dict], cp: Optional[dict], arms: Dict[str, Any], alpha: float,
            metric: str = DICE) -> Dict[str, Any]:
    """``row``'s paired Δ of ``metric`` against each control: mean, 95 % CI, MDE80 (at ``alpha``), number
    of pairs and the table's Holm verdict (None where no seed pairs)."""
    out: Dict[str, Any] = {}
    for role, control in (("real_only", real), ("copy_paste", cp)):
        gain = _pair(row, control, alpha, metric)
        gain = gain if gain and gain["n"] else None
        out.update({f"gain_vs_{role}": gain["mean"] if gain else None, f"gain_vs_{role}_ci95": _ci(gain),
                    f"mde80_vs_{role}": gain["mde80"] if gain else None, f"pairs_vs_{role}": gain["n"] if gain else 0,
                    f"significant_vs_{role}": _holm_significant(row, arms[role], metric)})
    return out


def _holm_significant(row: Optional[dict], baseline: str, metric: str = DICE) -> Optional[bool]:
    """Whether the table marked the row's Δ of ``metric`` against ``baseline`` significant after Holm."""
    for vs in (row or {}).get("vs", []):
        if vs["baseline_key"] == canon(baseline) and vs["diff"].get(metric):
            return bool(vs["diff"][metric].get("significant"))
    return None


def _external(real: Optional[dict], cp: Optional[dict], diff: Optional[dict], arms: Dict[str, Any],
              alpha: float) -> Dict[str, Any]:
    """The chosen diffusion arm against both controls on the modality's external set (None: not measured)."""
    return {"dice_real_only": _mean(real, EXTERNAL_DICE), "dice_copy_paste": _mean(cp, EXTERNAL_DICE),
            "dice_diffusion": _mean(diff, EXTERNAL_DICE), **_versus(diff, real, cp, arms, alpha, EXTERNAL_DICE),
            "mde80_alpha": alpha}


def _excluded(arm: Optional[dict], copy_paste: Optional[dict]) -> Optional[Dict[str, Any]]:
    """The arm's runs that accepted no pair (left out of its means) and its Dice with them counted in."""
    if not (arm and arm.get("no_accept")):
        return None
    everything = arm["all_runs"]
    with_them = paired_difference(everything["by_seed"][DICE], copy_paste["by_seed"][DICE]) if copy_paste else None
    return {"runs": arm["no_accept"], "seeds": arm["seeds_no_accept"], "dice_diffusion": everything["metrics"][DICE]["mean"],
            "gain_vs_copy_paste": with_them["mean"] if with_them else None, "gain_vs_copy_paste_ci95": _ci(with_them)}


def _describe(choice: Any) -> str:
    if isinstance(choice, str):
        return f"`{choice}`"
    return (f"per modality, the one of {', '.join(f'`{a}`' for a in choice['among'])} with the higher mean "
            f"{choice['choose_by']} (chosen on validation, before looking at test)")


def copy_sample_grid(spec: Dict[str, Any], runs: pd.DataFrame, dest: Path) -> Optional[Path]:
    """Copy the generate stage's ``grid.png`` (source | mask | generated | overlay) of one run next to
    ``results.md``: the lowest-seed finished run whose tags match ``spec["samples"]`` (e.g.
    ``{variant: synthetic_filtered}``).

    Returns:
        The copy; the copy already beside ``results.md`` when the stage folders are gone (a fresh
        clone tabulating exported records keeps the committed picture); None when neither exists.
    """
    chosen = runs
    for key, value in spec["samples"].items():
        col = column_of(key)
        chosen = chosen[chosen[col].map(canon) == canon(value)] if col in chosen else chosen.iloc[0:0]
    if "tags.sig_generate" not in chosen or not len(chosen):
        return None
    chosen = chosen.assign(_seed=pd.to_numeric(chosen.get("tags.seed"), errors="coerce")).sort_values("_seed")
    for _, run in chosen.iterrows():
        root = run.get("params.artifacts_dir")
        root = root if isinstance(root, str) and root else "artifacts"
        picture = Path(root) / "generate" / str(run["tags.sig_generate"]) / "grid.png"
        if picture.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(picture, dest)
            return dest
    return dest if dest.is_file() else None
