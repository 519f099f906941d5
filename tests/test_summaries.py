"""Exchange rates, templated notes, and the headline_by_modality / data_efficiency blocks from run records."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.config import ConfigError
from experiments.reporting import efficiency as eff
from experiments.reporting import run_records as rr

TABLES = Path(__file__).resolve().parents[1] / "experiments" / "tables"
BUDGETS = [8, 16, 32, 64]


def test_n_equivalent_interpolates_in_log_n_and_never_extrapolates():
    curve = [0.30, 0.40, 0.50, 0.60]
    assert eff.n_equivalent(0.40, BUDGETS, curve) == 16
    assert eff.n_equivalent(0.45, BUDGETS, curve) == pytest.approx(math.sqrt(16 * 32))  # halfway in log n
    assert eff.n_equivalent(0.61, BUDGETS, curve) == math.inf  # "more than 64"
    assert eff.n_equivalent(0.29, BUDGETS, curve) == 0.0  # "less than 8"
    flat = [0.30, 0.40, 0.40, 0.50]  # a plateau: the segment that actually reaches the target
    assert eff.n_equivalent(0.40, BUDGETS, flat) == 16
    assert eff.n_equivalent(0.45, BUDGETS, flat) == pytest.approx(math.sqrt(32 * 64))


def _dice(seeds=10, dip=False, gain=0.08):
    rng = np.random.default_rng(1)
    base = {8: 0.30, 16: 0.40, 32: 0.38 if dip else 0.50, 64: 0.60}
    noise = {s: rng.normal(0, 0.01) for s in map(str, range(seeds))}
    return {"real_only": {n: {s: base[n] + e for s, e in noise.items()} for n in BUDGETS},
            "diffusion": {n: {s: base[n] + gain + e + rng.normal(0, 0.005) for s, e in noise.items()} for n in BUDGETS}}


def test_exchange_rate_interval_inside_and_outside_the_range():
    out = eff.exchange_rates(_dice(), "real_only", BUDGETS)
    assert len(out["seeds"]) == 10 and out["monotone_fixed"] == [] and out["family"] == 4
    assert out["level"] == pytest.approx(1 - 0.05 / 4)  # Bonferroni over the family of rates
    at8, at64 = out["rates"]["diffusion"][8], out["rates"]["diffusion"][64]
    assert 8 < at8["n_equivalent"] < 16 and at8["ci95"][0] <= at8["n_equivalent"] <= at8["ci95"][1]
    assert at8["rate"] == pytest.approx(at8["n_equivalent"] / 8) and at8["supported_above_1"]
    assert at64["n_equivalent"] == "more than 64" and at64["rate"] == "more than 1"
    worse = eff.exchange_rates(_dice(gain=-0.15), "real_only", BUDGETS)
    assert worse["rates"]["diffusion"][8]["n_equivalent"] == "less than 8"
    assert eff.sentence(worse["rates"], {}, 4).startswith("No exchange rate above 1 is supported")
    assert "diffusion at n = 8" in eff.sentence(out["rates"], {}, 4)
    # an interval entirely below 1 is said too, and marked in the table; a gain never is
    assert worse["rates"]["diffusion"][16]["supported_below_1"] and not at8["supported_below_1"]
    assert "Below 1 by the interval" in eff.sentence(worse["rates"], {}, 4)
    assert "Below 1" not in eff.sentence(out["rates"], {}, 4)
    assert eff.table_body(worse["rates"], {}, {})[1][-1].endswith("▼")


def test_a_dipping_real_only_curve_is_made_monotone_and_said_so():
    out = eff.exchange_rates(_dice(dip=True), "real_only", BUDGETS)
    assert out["monotone_fixed"] == [32]


def test_rate_interval_excludes_1_exactly_when_the_paired_t_test_rejects():
    """The interval and the paired t-test of the arm's Dice Δ vs real only never disagree."""
    from scipy import stats

    rng = np.random.default_rng(3)
    for gain in np.linspace(-0.04, 0.04, 17):
        ref = np.array([[0.30, 0.40, 0.50, 0.60][b] + rng.normal(0, 0.03, 8) for b in range(4)])
        arm = ref[1] + gain + rng.normal(0, 0.02, 8)
        low, high = eff.rate_interval(arm, ref, BUDGETS, 0.95)
        rejects = stats.ttest_rel(arm, ref[1]).pvalue < 0.05
        assert (low > 16 or high < 16) == rejects


def test_rate_intervals_cover_a_known_truth_at_their_nominal_level():
    """Simulated runs from a known real-only curve and arm: nominal 95 % intervals cover the true
    matched budget 93-97 % of the time (2000 replicate blocks of 10 seeds, seed effects shared)."""
    rng = np.random.default_rng(0)
    curve = np.array([0.25, 0.32, 0.37, 0.40])  # true real-only mean Dice at 8, 16, 32, 64
    true_n = 22.0  # the arm at n = 16 is worth 22 real pairs on that curve
    target = float(np.interp(math.log(true_n), np.log(BUDGETS), curve))
    covered, reps = 0, 2000
    for _ in range(reps):
        seed_effect = rng.normal(0, 0.04, 10)
        ref = curve[:, None] + seed_effect[None, :] + rng.normal(0, 0.03, (4, 10))
        arm = target + seed_effect + rng.normal(0, 0.03, 10)
        low, high = eff.rate_interval(arm, ref, BUDGETS, 0.95)
        covered += low <= true_n <= high
    assert 0.93 <= covered / reps <= 0.97


def _records(tmp_path, grid, variants, seeds, budgets=(16,), dice=None, sha="abc1234", val=None, extra=None):
    records = []
    for seed in seeds:
        for n in budgets:
            for i, variant in enumerate(variants):
                value = (dice or (lambda v, n, s, i: 0.3 + 0.05 * i + 0.1 * math.log2(n / 8) + 0.003 * (s % 5)))(variant, n, seed, i)
                cell = f"{variant}-{n}-{seed}"
                tags = {"grid": grid, "cell": cell, "variant": variant, "seed": str(seed), "git_sha": sha, "sig": "s"}
                metrics = {"test/dice": value, "test/fnr_small": 0.5 - value / 2,
                           "val/dice": (val or (lambda v, d: d))(variant, value), **(extra or (lambda v, s, d: {}))(variant, seed, value)}
                records.append(rr.make_record(grid, cell, f"r-{cell}", 1000 + len(records), "FINISHED", tags,
                                              {"data.n_real": str(n)}, metrics))
    rr.write_records(records, tmp_path / f"{grid}.jsonl")


def test_headline_by_modality_from_records_with_pending_modalities(tmp_path):
    from experiments.reporting.table_cli import main

    arms = ["real_only", "copy_paste", "diffusion", "diffusion_gate", "diffusion_base_only"]
    _records(tmp_path, "headline_polyp", arms, range(100, 120))
    _records(tmp_path, "headline_skin", arms, range(100, 110))
    assert main([str(TABLES / "headline_by_modality.yaml"), "--runs", str(tmp_path), "--write",
                 str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    block = result["headline_by_modality"]
    assert set(block) >= {"polyp", "skin", "fundus", "ultrasound", "frozen_code", "seed_block"}
    polyp = block["polyp"]
    assert polyp["seeds"] == list(range(100, 120)) and block["skin"]["n_seeds"] == 10
    for key in ("dice_real_only", "dice_copy_paste", "dice_diffusion", "gain_vs_real_only_ci95",
                "gain_vs_copy_paste_ci95", "mde80_vs_copy_paste"):
        assert key in polyp
    # the gate arm has the higher validation Dice, so the rule picks it: diffusion_gate (i=3) - copy_paste (i=1)
    assert polyp["diffusion_arm"] == "diffusion_gate" and polyp["gain_vs_copy_paste"] == pytest.approx(0.10)
    # dice_diffusion is the chosen arm's Dice, never the no-gate arm's (whose variant is "diffusion")
    assert polyp["dice_diffusion"] == pytest.approx(polyp["dice_by_arm"]["diffusion_gate"])
    assert polyp["dice_diffusion"] - polyp["dice_by_arm"]["diffusion"] == pytest.approx(0.05)
    assert polyp["dice_diffusion"] - polyp["dice_copy_paste"] == pytest.approx(polyp["gain_vs_copy_paste"])
    assert result["frozen_code"] == block["frozen_code"] == "abc1234" and result["seed_block"] == 100
    assert block["fundus"]["seeds"] == [] and block["fundus"]["dice_real_only"] is None
    text = (tmp_path / "r.md").read_text()
    assert "fundus (headline_fundus) (pending) | pending: no runs yet; run `meddiffaug grid sweeps/grids/headline_fundus.yaml`" in text
    assert "polyp +0.100 [" in text and "{" not in text  # the findings are written from the numbers
    assert "## Findings" in text and polyp["mde80_alpha"] == pytest.approx(
        0.05 / result["tables"]["headline_by_modality"]["holm_family"], rel=1e-5)


def test_headline_diffusion_arm_is_chosen_on_validation_never_on_test(tmp_path):
    from experiments.reporting.headlines import chosen_arm
    from experiments.reporting.table_cli import main

    arms = ["real_only", "copy_paste", "diffusion", "diffusion_gate", "diffusion_base_only"]
    # test Dice favours the gate (i=3), validation Dice favours no gate: validation decides
    _records(tmp_path, "headline_polyp", arms, range(100, 110), val=lambda v, d: d + (0.2 if v == "diffusion" else 0))
    assert main([str(TABLES / "headline_by_modality.yaml"), "--runs", str(tmp_path), "--write",
                 str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 0
    polyp = json.loads((tmp_path / "r.json").read_text())["headline_by_modality"]["polyp"]
    assert polyp["diffusion_arm"] == "diffusion" and polyp["gain_vs_copy_paste"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="never on test"):
        chosen_arm({"choose_by": "test/dice", "among": ["diffusion", "diffusion_gate"]}, {"rows": []})


def test_data_efficiency_table_plot_and_exchange_rates(tmp_path):
    from experiments.reporting.table_cli import main

    gains = {"real_only": 0.0, "copy_paste": 0.02, "diffusion": 0.08, "synthetic_only": -0.2}
    _records(tmp_path, "data_efficiency", list(gains), range(100, 110), BUDGETS,
             dice=lambda v, n, s, i: 0.3 + 0.1 * math.log2(n / 8) + gains[v] + 0.01 * ((s * 7 + i) % 3))
    assert main([str(TABLES / "data_efficiency.yaml"), "--runs", str(tmp_path / "data_efficiency.jsonl"),
                 "--write", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 0
    block = json.loads((tmp_path / "r.json").read_text())["data_efficiency"]
    assert block["n_real"] == BUDGETS and block["seeds"] == [str(s) for s in range(100, 110)]
    assert set(block["dice"]) == set(gains) and len(block["dice"]["diffusion"]) == 4
    rate = block["exchange_rate"]["diffusion"]["8"]
    assert 8 < rate["n_equivalent"] < 16 and len(rate["ci95"]) == 2
    assert block["exchange_rate"]["synthetic_only"]["8"]["n_equivalent"] == "less than 8"
    text = (tmp_path / "r.md").read_text()
    assert (tmp_path / "data_efficiency.png").stat().st_size > 1000 and "![" in text
    assert "Exchange rates above 1 supported" in text and "Kvasir-SEG at 10 %, 25 %, 100 %" in text
    assert block["interval"]["family"] == 12 and block["interval"]["correction"] == "Bonferroni"


def test_note_placeholders_are_checked_and_filled(tmp_path):
    from experiments.reporting.spec import load_table

    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: g\ncolumns: [test/dice]\nnotes: 'Dice {dcie.real_only.mean:.3f}'\n")
    with pytest.raises(ConfigError, match="dcie"):
        load_table(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("grid: g\nrows: {by: variant, order: [a, b]}\ncolumns: [test/dice]\nbaseline: a\n"
                    "notes: 'Dice {dice.c.mean:.3f}'\n")
    spec = load_table(typo)
    from experiments.reporting.aggregate import build_table
    from experiments.reporting.table_render import render_section

    import pandas as pd

    runs = pd.DataFrame({"tags.variant": ["a", "a"], "tags.seed": ["0", "1"], "metrics.test/dice": [0.5, 0.6]})
    with pytest.raises(ConfigError, match="has no 'c'"):
        render_section(spec, build_table(spec, runs))
    spec["notes"] = "a {dice.a.mean:.2f} {dice.a.ci:.2f}; b {dice.b.mean:.3f}; Δ {diff.dice.b.a.mean:+.3f}"
    text = render_section(spec, build_table(spec, runs))
    assert "a 0.55 [-0.09, 1.19]; b n/a; Δ n/a" in text  # b is declared but has no runs yet


def test_external_columns_from_runs_that_have_them_and_not_measured_otherwise(tmp_path):
    """A table naming each grid's external set reads test/<set>/* as test/external/*: columns, paired Δs
    in the Holm family, results.json's per-modality ``external`` block, and "not measured" where no run
    measured the set."""
    import yaml

    from experiments.reporting.table_cli import main

    arms = ["real_only", "copy_paste", "diffusion", "diffusion_gate"]
    center_b = lambda v, s, d: {"test/procedural_polyp_center_b/dice": d - 0.1 + 0.02 * (v == "diffusion_gate")}  # noqa: E731
    _records(tmp_path, "headline_polyp", arms, range(100, 110), extra=center_b)
    _records(tmp_path, "headline_skin", arms, range(100, 110))
    spec = yaml.safe_load((TABLES / "headline_by_modality.yaml").read_text())
    spec["external"] = {"polyp": "procedural_polyp_center_b", "skin": "procedural_skin_center_b"}
    spec["columns"].append({"metric": "test/external/dice", "name": "Dice (external)", "format": ".3f", "ci": True})
    spec["compare"] = ["test/dice", "test/external/dice"]
    path = tmp_path / "headline_external.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--runs", str(tmp_path), "--write", str(tmp_path / "r.md"),
                 "--json", str(tmp_path / "r.json")]) == 0
    block = json.loads((tmp_path / "r.json").read_text())["headline_by_modality"]
    polyp = block["polyp"]["external"]["procedural_polyp_center_b"]
    # diffusion_gate (i=3) vs copy_paste (i=1): +0.10 in-domain, +0.12 on center B
    assert polyp["gain_vs_copy_paste"] == pytest.approx(0.12) and polyp["pairs_vs_copy_paste"] == 10
    assert polyp["dice_diffusion"] - polyp["dice_copy_paste"] == pytest.approx(0.12)
    assert polyp["mde80_vs_copy_paste"] is not None and polyp["significant_vs_copy_paste"] is not None
    skin = block["skin"]["external"]["procedural_skin_center_b"]
    assert skin["dice_diffusion"] is None and skin["gain_vs_copy_paste"] is None and skin["pairs_vs_copy_paste"] == 0
    text = (tmp_path / "r.md").read_text()
    skin_row = next(line for line in text.splitlines() if line.startswith("| skin · diffusion + calibrated gate"))
    assert skin_row.count("not measured") == 3  # the column and its two Δs
    assert "on the external test sets (polyp: procedural_polyp_center_b" in text
    with pytest.raises(ConfigError, match="external"):
        spec["external"] = {"colon": "x"}
        path.write_text(yaml.safe_dump(spec))
        main([str(path), "--runs", str(tmp_path)])


def test_block200_reports_its_preregistered_primary_comparison_holm_over_four(tmp_path):
    from experiments.reporting.table_cli import main

    arms = ["real_only", "copy_paste", "diffusion", "diffusion_gate"]
    noise = lambda s: 0.02 * math.sin(3.7 * s)  # noqa: E731  (a per-seed wobble, so differences vary)
    polyp = lambda v, n, s, i: 0.40 + (0.05 + noise(s) if v == "diffusion_gate" else 0.0)  # noqa: E731
    skin = lambda v, n, s, i: 0.50 + (noise(s) if v == "diffusion_gate" else 0.0)  # noqa: E731
    _records(tmp_path, "headline200_polyp", arms, range(200, 223), dice=polyp)
    _records(tmp_path, "headline200_skin", arms, range(200, 236), dice=skin)
    assert main([str(TABLES / "headline_block200.yaml"), "--runs", str(tmp_path), "--write",
                 str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["seed_block"] == 200 and result["preregistration"] == "sweeps/preregistration/block200.md"
    assert result["amendments"] == ["sweeps/preregistration/block200_amendment1.md"]
    assert result["primary"] == {"arm": "diffusion_gate", "versus": "copy_paste", "metric": "test/dice",
                                 "alpha": 0.05, "family": 4}
    block = result["headline_by_modality"]
    gain, flat = block["polyp"]["primary"], block["skin"]["primary"]
    assert gain["n"] == 23 and gain["mean"] == pytest.approx(0.05 + np.mean([noise(s) for s in range(200, 223)]))
    # Holm over four, the unmeasured two entering with p = 1: the smallest p is multiplied by 4
    assert gain["significant"] and gain["p_holm"] == pytest.approx(min(1.0, 4 * gain["p"]), rel=1e-6)
    assert flat["n"] == 36 and not flat["significant"] and flat["p_holm"] >= flat["p"]
    assert block["fundus"]["primary"] == {"mean": None, "ci95": [None, None], "p": None, "n": 0, "mde80": None,
                                          "p_holm": None, "significant": None}
    assert 0 < gain["mde80"] < 0.05  # at α = 0.05/4, from the observed paired SD of the wobble
    assert block["polyp"]["diffusion_arm"] == "diffusion_gate"  # fixed before the block: never chosen after it
    text = (tmp_path / "r.md").read_text()
    assert ("Primary comparison (pre-registered in `sweeps/preregistration/block200.md`, amended in "
            "`sweeps/preregistration/block200_amendment1.md`)") in text
    assert "* fundus: not measured" in text
    findings = text.split("## Findings")[1].split("\n## ")[0]
    assert "(`diffusion_gate`) was fixed before the runs" in findings and "chosen on validation" not in findings
    primary_line = next(line for line in findings.splitlines() if line.startswith("- Primary comparison"))
    assert "Holm over the 4 modalities" in primary_line and "significant in polyp (better)" in primary_line
    assert "Not measured: fundus, ultrasound (each counted with p = 1)" in primary_line
    # the primary replaces the headline arm's copy-paste contrast (one verdict in its own family) ...
    assert "`diffusion_gate` against the copy-paste control (test Dice" not in findings
    assert "`diffusion_gate` against real only (test Dice" in findings
    # ... and the arm the headline does not report is reported beside it, never dropped
    assert "`diffusion` against the copy-paste control (test Dice" in findings
    assert "`diffusion` against real only (test Dice" in findings
    assert set(block["polyp"]["other_arms"]) == {"diffusion"}
    assert block["polyp"]["other_arms"]["diffusion"]["gain_vs_copy_paste"] == pytest.approx(0.0)


def test_a_block_amended_for_one_modality_names_each_modalitys_commit(tmp_path):
    """One commit per modality is an amended block, said plainly; two within one modality is a warning."""
    from experiments.reporting.table_cli import main

    arms = ["real_only", "copy_paste", "diffusion", "diffusion_gate"]
    _records(tmp_path, "headline_polyp", arms, range(100, 105), sha="aaa1111")
    _records(tmp_path, "headline_skin", arms, range(100, 105), sha="bbb2222")
    args = [str(TABLES / "headline_by_modality.yaml"), "--runs", str(tmp_path), "--write", str(tmp_path / "r.md"),
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["frozen_code"] == {"polyp": "aaa1111", "skin": "bbb2222"}
    text = (tmp_path / "r.md").read_text()
    assert "Code: `aaa1111` (polyp), `bbb2222` (skin);" in text and "⚠ the runs of" not in text
    records = (tmp_path / "headline_skin.jsonl").read_text().splitlines()
    mixed = [line.replace("bbb2222", "ccc3333") if i % 2 else line for i, line in enumerate(records)]
    (tmp_path / "headline_skin.jsonl").write_text("\n".join(mixed) + "\n")  # half of skin on another commit
    assert main(args) == 0
    assert "⚠ the runs of skin come from several commits" in (tmp_path / "r.md").read_text()
