"""The ``## Findings`` of ``results.md``: sentences written from the numbers, whatever they say.

Each sentence claims no more than its interval and its test: a difference is called significant only
after the table's Holm correction, and the power statement uses the MDE at the same level.
"""
from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional

from experiments.reporting.stats import fmt


def _delta(value: Optional[float], ci: List[Optional[float]]) -> str:
    return f"{fmt(value, '.3f', True)} [{fmt(ci[0], '.3f', True)}, {fmt(ci[1], '.3f', True)}]"


def _contrast(entries: Mapping[str, Mapping[str, Any]], against: str, family: int, name: str,
              subject: str = "Diffusion") -> str:
    """One sentence per baseline: the Δs per modality, what survives Holm, and the power at that level."""
    measured = {m: e for m, e in entries.items() if e.get(f"gain_vs_{against}") is not None}
    if not measured:
        return ""
    listed = ", ".join(f"{m} {_delta(e[f'gain_vs_{against}'], e[f'gain_vs_{against}_ci95'])} "
                       f"({e.get(f'pairs_vs_{against}', e['n_seeds'])} paired seeds)" for m, e in measured.items())
    significant = [m for m, e in measured.items() if e.get(f"significant_vs_{against}")]
    verdict = (f"after Holm's correction over the table's {family} comparisons, none of these differences is "
               "significant" if not significant else
               f"after Holm's correction over the table's {family} comparisons, significant in: "
               + ", ".join(f"{m} ({'better' if measured[m][f'gain_vs_{against}'] > 0 else 'worse'})" for m in significant))
    mdes = {m: e.get(f"mde80_vs_{against}") for m, e in measured.items()}
    mdes = {m: v for m, v in mdes.items() if v is not None and math.isfinite(v)}
    power = ""
    if mdes:
        power = f" At that level, {_power(mdes)}"
    return f"{subject} against {name} (test Dice, paired by seed, 95 % CI): {listed}; {verdict}.{power}"


def _power(mdes: Mapping[str, float]) -> str:
    """The 80 %-power sentence over the modalities' minimum detectable effects (MDE80)."""
    low, high = min(mdes, key=mdes.get), max(mdes, key=mdes.get)
    span = (f"is {fmt(mdes[low])} Dice ({low})" if low == high else
            f"ranges from {fmt(mdes[low])} Dice ({low}) to {fmt(mdes[high])} ({high})")
    return (f"the smallest true difference these seeds detect with 80 % power {span}; smaller true differences, "
            "in either direction, are not ruled out.")


def _primary(primary: Mapping[str, Any]) -> str:
    """The pre-registered comparison's sentence: per modality Δ, CI and Holm p within its own family."""
    by = primary["by_modality"]
    measured = {m: e for m, e in by.items() if e.get("mean") is not None}
    missing = [m for m in by if m not in measured]
    name = f"`{primary['arm']}` against `{primary['versus']}`"
    if not measured:
        return f"Primary comparison (pre-registered, {name}): not measured yet."
    listed = ", ".join(f"{m} {_delta(e['mean'], e['ci95'])} ({e['n']} paired seeds, Holm p = {fmt(e['p_holm'], '.3g')})"
                       for m, e in measured.items())
    significant = [m for m, e in measured.items() if e.get("significant")]
    verdict = ("significant in none" if not significant else "significant in " + ", ".join(
        f"{m} ({'better' if measured[m]['mean'] > 0 else 'worse'})" for m in significant))
    text = (f"Primary comparison (pre-registered, {name}, {primary['metric']}, paired by seed, 95 % CI, Holm over "
            f"the {primary['family']} modalities at α = {primary['alpha']}): {listed}; {verdict}.")
    if missing:
        text += f" Not measured: {', '.join(missing)} (each counted with p = 1)."
    mdes = {m: e["mde80"] for m, e in measured.items() if e.get("mde80") is not None}
    return text + (f" At α = {primary['alpha']}/{primary['family']}, {_power(mdes)}" if mdes else "")


def headline(entries: Mapping[str, Mapping[str, Any]], family: int,
             primary: Optional[Mapping[str, Any]] = None) -> List[str]:
    """Findings of ``headline_by_modality``: the pre-registered comparison (when the spec has one), the
    contrasts, the gate's flags, the thin gate runs.

    Args:
        entries: modality -> its ``headline_by_modality`` entry (modalities without runs are skipped).
        family: the Holm family size of the table the Δs come from.
        primary: :func:`experiments.reporting.primary.primary_comparison`'s result, or None. When it is
            the headline arm against copy-paste, it replaces that contrast (one verdict, in its own family).

    Returns:
        Sentences (Markdown), possibly empty.
    """
    entries = {m: e for m, e in entries.items() if isinstance(e, dict) and e.get("n_seeds")}
    if not entries:
        return []
    out = [_choice(entries)]
    arms = {e["diffusion_arm"] for e in entries.values()}
    # the primary comparison replaces the headline arm's contrast against the same control
    replaced = primary["versus"] if primary and arms == {primary["arm"]} else None
    out += [_primary(primary)] if primary else []
    subject = f"`{next(iter(arms))}`" if _fixed(entries) and len(arms) == 1 else "Diffusion"
    out += [_contrast(entries, control, family, name, subject) for control, name in
            (("copy_paste", "the copy-paste control"), ("real_only", "real only")) if control != replaced]
    out = [s for s in out if s]
    external = {m: {**numbers, "n_seeds": e["n_seeds"]} for m, e in entries.items()
                for numbers in (e.get("external") or {}).values()}
    if external:
        sets = ", ".join(f"{m}: {s}" for m, e in entries.items() for s in (e.get("external") or {}))
        out += [s for s in (_contrast(external, "copy_paste", family,
                                      f"the copy-paste control on the external test sets ({sets})", subject),
                            _contrast(external, "real_only", family, "real only on the external test sets", subject)) if s]
    others = sorted({a for e in entries.values() for a in e.get("other_arms") or {}})
    for arm in others:
        mine = {m: {**e["other_arms"][arm], "n_seeds": e["n_seeds"]} for m, e in entries.items()
                if arm in (e.get("other_arms") or {})}
        out += [s for s in (_contrast(mine, "copy_paste", family, "the copy-paste control", f"`{arm}`"),
                            _contrast(mine, "real_only", family, "real only", f"`{arm}`")) if s]
    flagged = [m for m, e in entries.items() if e.get("gate_flagged")]
    if flagged:
        out.append(f"The headline arm's gate is flagged (⚠) in {len(flagged)} of {len(entries)} modalities "
                   f"({', '.join(flagged)}): its real lesion pass rate or its rejection of wrong pairs is below the "
                   "table's threshold, so its verdicts are not evidence that the accepted samples are good.")
    for m, e in entries.items():
        thin = e.get("excluded_no_accept")
        if thin:
            out.append(f"In {m}, {_runs(thin['runs'])} of the chosen arm accepted no synthetic pair (seed "
                       f"{', '.join(thin['seeds'])}) and {'is' if thin['runs'] == 1 else 'are'} left out of its "
                       "numbers; counted in, the Δ against copy-paste would be "
                       f"{_delta(thin['gain_vs_copy_paste'], thin['gain_vs_copy_paste_ci95'])}.")
    return out


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def _fixed(entries: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the spec fixed the headline's diffusion arm (no rule chose among candidates)."""
    return all(e.get("candidates") == [e["diffusion_arm"]] for e in entries.values())


def _choice(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """Which diffusion arm each modality reports, and where the arm not chosen did better on test."""
    chosen = sorted({e["diffusion_arm"] for e in entries.values()})
    if _fixed(entries):
        return (f"The headline's diffusion arm ({', '.join(f'`{a}`' for a in chosen)}) was fixed before the runs; "
                "the table reports every diffusion arm with its paired differences.")
    text = ("The diffusion arm of each modality was chosen on validation Dice by a rule fixed before the runs "
            f"(chosen: {', '.join(f'`{a}`' for a in chosen)}).")
    better = []
    for m, e in entries.items():
        mine = e["dice_by_arm"].get(e["diffusion_arm"])
        others = {a: e["dice_by_arm"].get(a) for a in e.get("candidates", []) if a != e["diffusion_arm"]}
        better += [f"{m} (`{a}`: {fmt(v)} against {fmt(mine)})" for a, v in others.items()
                   if v is not None and mine is not None and v > mine]
    if better:
        text += " The arm not chosen had the higher mean test Dice in " + ", ".join(better) + "; the rule stands."
    return text


def efficiency(sentence: str) -> List[str]:
    """Findings of ``data_efficiency``: its exchange-rate sentence."""
    return [sentence] if sentence else []


def render(findings: List[str]) -> List[str]:
    """The ``## Findings`` section as Markdown lines (nothing when there is nothing to say)."""
    if not findings:
        return []
    return ["## Findings", "", "Written by the table command from the numbers below; each claim is bounded by its "
            "interval and its Holm-corrected test.", ""] + [f"- {f}" for f in findings] + [""]
