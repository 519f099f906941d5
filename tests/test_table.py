"""``meddiffaug table`` end to end on a fake MLflow store: numbers, pairing, flags, files."""
import json
import re
import time
from pathlib import Path

import pytest
from scipy import stats as st

from experiments.config import ConfigError, load_config
from experiments.reporting.keys import canon
from experiments.reporting.sources import collect_runs
from experiments.reporting.spec import load_table
from experiments.reporting.table_cli import main

TABLES = Path(__file__).resolve().parents[1] / "experiments" / "tables"

# variant -> seed -> metrics. synthetic_filtered seed 4 has no real_only partner.
DICE = {"real_only": [0.50, 0.55, 0.45, 0.60],
        "synthetic_filtered": [0.58, 0.60, 0.50, 0.66, 0.70],
        "copy_paste": [0.52, 0.56, 0.10, 0.61],
        "synthetic_unfiltered": [0.40, 0.42, 0.38, 0.44]}


def _log_run(mlflow, grid, tags, metrics):
    with mlflow.start_run(tags={"grid": grid, **tags}):
        mlflow.log_params({"data.name": "procedural_polyp", "data.n_real": "16"})
        mlflow.log_metrics(metrics)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with a fake diffaug_main grid and a fake θ × ratio grid."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("diffaug_main", artifact_location=(root / "art").as_uri())
    mlflow.set_experiment("diffaug_main")
    with mlflow.start_run(tags={"grid": "diffaug_main"}):  # a grid parent run: no row tag
        mlflow.log_metric("test/dice", 0.0)
    for variant, dices in DICE.items():
        for seed, dice in enumerate(dices):
            metrics = {"test/dice": dice, "test/iou": dice - 0.1, "test/fnr": 0.3,
                       "test/fnr_small": 0.5 - dice / 2,
                       "seg/collapsed": float(variant == "copy_paste" and seed == 2),
                       "gen/real_pass_rate": 0.43 if variant == "synthetic_unfiltered" else 0.95,
                       "gen/real_misplaced_reject_rate": 0.2 if variant == "synthetic_filtered" else 0.9,
                       "gen/real_missing_reject_rate": 0.9, "gen/accept_rate": 0.6}
            _log_run(mlflow, "diffaug_main", {"variant": variant, "seed": str(seed),
                                              "cell": f"{variant}-{seed}"}, metrics)
    run = mlflow.start_run(tags={"grid": "diffaug_main", "variant": "real_only", "seed": "9",
                                 "cell": "real_only-9"})
    mlflow.log_metric("test/dice", 0.99)
    mlflow.end_run(status="FAILED")  # must not count
    mlflow.create_experiment("ablation_main", artifact_location=(root / "art2").as_uri())
    mlflow.set_experiment("ablation_main")
    for theta, accept in ((0.5, 0.9), (0.7, 0.6), (0.9, 0.2)):  # the θ slice, at ratio 3
        for seed in range(3):
            _log_run(mlflow, "ablation_main",
                     {"axis.validator.iou_threshold": str(theta), "seed": str(seed), "variant": "theta",
                      "cell": f"theta-{theta}-{seed}"},
                     {"gen/accept_rate": accept, "test/dice": 0.5 + theta / 10 + seed / 100 + 3 / 50,
                      "gen/real_pass_rate": 0.9})
    for ratio in (1, 3):  # the ratio slice, at θ = 0.7; sweeps/grid.py tags json.dumps(value): "3"
        for seed in range(3):
            _log_run(mlflow, "ablation_main",
                     {"axis.augment.ratio": str(ratio), "seed": str(seed), "variant": "ratio",
                      "cell": f"ratio-{ratio}-{seed}"},
                     {"gen/accept_rate": 0.6, "test/dice": 0.57 + seed / 100 + ratio / 50,
                      "gen/real_pass_rate": 0.9})
    mlflow.create_experiment("meddiff_ft", artifact_location=(root / "art3").as_uri())
    mlflow.set_experiment("meddiff_ft")
    for arch, base in (("Unet", 0.5), ("FPN", 0.3)):
        for variant, gain in (("real", 0.0), ("augmented", 0.1), ("no_erosion", 0.05)):
            for seed in range(2):
                _log_run(mlflow, "meddiff_ft", {"axis.segmenter.arch": arch, "variant": variant,
                                                "seed": str(seed), "cell": f"{arch}-{variant}-{seed}"},
                         {"test/dice": base + gain + seed * (0.01 + gain)})
    return uri


@pytest.fixture(scope="module")
def outputs(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    md, js = out / "results.md", out / "results.json"
    argv = [str(TABLES / name) for name in
            ("diffaug_main.yaml", "diffaug_ablation_theta.yaml", "diffaug_ablation_ratio.yaml",
             "msdm.yaml", "meddiff_ft.yaml")]
    assert main(argv + ["--write", str(md), "--json", str(js), "--tracking-uri", store,
                        "--no-log"]) == 0
    return md.read_text(), json.loads(js.read_text()), out


def _rows(result, table):
    return {r["key"][0]: r for r in result["tables"][table]["rows"]}


def _md_row(text, label):
    # a flagged row's label carries a "⚠ " prefix
    return next(line for line in text.splitlines()
                if line.startswith(f"| {label}") or line.startswith(f"| ⚠ {label}"))


def test_results_md_says_it_is_generated(outputs):
    text, _, _ = outputs
    first, second = text.splitlines()[:2]
    assert first.startswith("<!-- generated by meddiffaug table ") and "do not edit" in first
    assert second.startswith("Generated by `meddiffaug table ") and "do not edit by hand" in second
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert [t.split(":")[0] for t in titles] == ["## DiffAug on procedural polyps", "## DiffAug ablation",
                                                 "## DiffAug ablation", "## MSDM", "## MedDiff-FT"]
    assert "Filled by: `meddiffaug grid sweeps/grids/diffaug_main.yaml" in text


def test_means_and_ci_from_finished_runs_only(outputs):
    text, result, _ = outputs
    rows = _rows(result, "diffaug_main")
    real = rows["real_only"]
    assert real["n"] == 4  # the FAILED seed-9 run and the untagged parent run are left out
    dice = real["metrics"]["test/dice"]
    assert dice["mean"] == pytest.approx(0.525)
    assert dice["ci95_low"] < dice["mean"] < dice["ci95_high"]
    assert "0.525 ± 0.065 [" in _md_row(text, "Real only")
    assert "n = 4–5 seeds per row" in text


def test_paired_difference_by_seed(outputs):
    text, result, _ = outputs
    gated = _rows(result, "diffaug_main")["synthetic_filtered"]
    vs_real = gated["vs"][0]
    assert vs_real["baseline"] == "Real only (standard augmentation)"
    diff = vs_real["diff"]["test/dice"]
    diffs = [0.08, 0.05, 0.05, 0.06]  # seed 4 has no real-only partner
    half = st.t.ppf(0.975, 3) * st.tstd(diffs) / 2
    assert diff["n"] == 4 and diff["mean"] == pytest.approx(0.06)
    assert diff["ci95_low"] == pytest.approx(0.06 - half)
    assert diff["ci95_high"] == pytest.approx(0.06 + half)
    row = _md_row(text, "Diffusion + quality filter")
    # significant after Holm over the table's comparisons; every Δ prints its MDE at 80 % power
    assert f"**+0.060** ▲ [+{0.06 - half:.3f}, +{0.06 + half:.3f}] (n=4; MDE " in row
    assert diff["significant"] and diff["p_holm"] >= diff["p"]
    assert "reference" in _md_row(text, "Real only")


def test_collapsed_runs_are_counted_not_hidden(outputs):
    text, result, _ = outputs
    cp = _rows(result, "diffaug_main")["copy_paste"]
    assert cp["collapsed"] == 1 and cp["seeds_collapsed"] == ["2"]
    assert cp["metrics"]["test/dice"]["mean"] == pytest.approx(sum(DICE["copy_paste"]) / 4)
    row = _md_row(text, "Copy-paste")
    assert "(1 collapsed)" in row.split("|")[2]
    assert "(1 collapsed)" not in row.split("|")[6]  # generation metrics are not affected
    assert "collapsed: a run whose best validation Dice" in text


def test_gate_sanity_flag(outputs):
    text, result, _ = outputs
    assert _rows(result, "diffaug_main")["synthetic_unfiltered"]["gate_warning"]
    assert _md_row(text, "⚠ Diffusion, no gate")
    assert "the gate's real pass rate is only 0.43 (mean `gen/real_pass_rate` on real validation lesion pairs" in text
    assert not _rows(result, "diffaug_main")["real_only"]["gate_warning"]
    # passing real pairs is not enough: a gate must also reject them made wrong
    assert _rows(result, "diffaug_main")["synthetic_filtered"]["gate_warning"]
    assert "reject rates on real lesions made wrong are only 0.20 (misplaced), 0.90 (missing)" in text


def test_pending_rows_show_commands_not_numbers(outputs):
    text, _, _ = outputs
    for dataset, config in (("Kvasir-SEG", "kvasir_seg"), ("CVC-ClinicDB", "cvc_clinicdb"),
                            ("REFUGE2", "refuge2")):
        row = _md_row(text, f"{dataset} (pending)")
        assert f"meddiffaug run experiments/configs/{config}_diffaug.yaml data.root=" in row
        assert f"needs data.root=<{dataset} folder> and a GPU" in row
        assert not re.search(r"\d\.\d{3}", row)  # no number no run produced
    # every paper table names its real-data runs; the configs they point at exist and load
    sections = text.split("\n## ")[1:]
    assert len(sections) == 5 and all("(pending) | pending: needs data.root=" in sec for sec in sections)
    for config in set(re.findall(r"meddiffaug run (experiments/configs/\S+\.yaml)", text)):
        assert load_config(Path(__file__).resolve().parents[1] / config).name == Path(config).stem


def test_headline(outputs):
    _, result, _ = outputs
    h = result["headline"]
    assert set(h) >= {"dataset", "n_real", "seeds", "dice_real_only", "dice_augmented", "gain",
                      "gain_ci95", "small_lesion_fnr_real_only", "small_lesion_fnr_augmented",
                      "dice_copy_paste", "gain_vs_copy_paste", "gain_vs_copy_paste_ci95"}
    assert h["dataset"] == "procedural_polyp" and str(h["n_real"]) == "16" and h["seeds"] == 4
    assert h["gain"] == pytest.approx(0.06) and h["gain_ci95"][0] < 0.06 < h["gain_ci95"][1]
    assert h["dice_augmented"] == pytest.approx(sum(DICE["synthetic_filtered"]) / 5)
    cp_diffs = [a - b for a, b in zip(DICE["synthetic_filtered"], DICE["copy_paste"])]
    assert h["gain_vs_copy_paste"] == pytest.approx(sum(cp_diffs) / 4)


def test_ablation_filter_rows_and_plots(outputs):
    text, result, out = outputs
    theta = _rows(result, "diffaug_ablation_theta")
    # declared rows show up before their runs exist (θ = 0.6 and 0.8 have none in this store)
    assert list(theta) == ["0.5", "0.6", "0.7", "0.8", "0.9"]
    assert [r["n"] for r in theta.values()] == [3, 0, 3, 0, 3]
    # filter variant: theta (ratio 3): dice = 0.5 + θ/10 + 0.06 + seed/100
    assert theta["0.7"]["metrics"]["test/dice"]["mean"] == pytest.approx(0.64)
    assert _md_row(text, "0.7 (DiffAug's θ)")
    ratio = _rows(result, "diffaug_ablation_ratio")
    assert [k for k, r in ratio.items() if r["n"]] == ["1", "3"]
    assert (out / "diffaug_ablation_theta.png").stat().st_size > 1000
    assert (out / "diffaug_ablation_ratio.png").is_file()
    assert "![DiffAug ablation: validator IoU threshold θ (ratio 3)](diffaug_ablation_theta.png)" in text


def test_missing_grid_says_how_to_fill_it(outputs):
    text, result, _ = outputs
    assert "No runs yet: run `meddiffaug grid sweeps/grids/msdm.yaml" in text
    assert result["tables"]["msdm"]["n_runs"] == 0


def test_collect_runs_filters_and_handles_missing_experiment(store):
    df = collect_runs("ablation_main", store, {"variant": "ratio", "seed": "1"})
    assert len(df) == 2 and set(df["tags.axis.augment.ratio"]) == {"1", "3"}
    assert collect_runs("no_such_grid", store).empty


def test_tables_run_logged(store, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the artifact root is relative to the working directory
    md = tmp_path / "r.md"
    assert main([str(TABLES / "msdm.yaml"), "--write", str(md), "--tracking-uri", store]) == 0
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["tables"])
    assert len(runs) >= 1 and (runs["tags.mlflow.runName"] == "tables").all()


def test_bad_table_yaml_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: g\ncolumns: [test/dice]\nbaselin: real_only\n")
    with pytest.raises(ConfigError, match="baselin"):
        load_table(bad)


def test_canon():
    assert canon(3.0) == canon("3") == "3" and canon(0.7) == canon("0.70") == "0.7"
    assert canon("real_only") == "real_only"


def test_composite_rows_pair_within_the_same_architecture(outputs):
    text, result, _ = outputs
    rows = {tuple(r["key"]): r for r in result["tables"]["meddiff_ft"]["rows"]}
    assert list(rows) == [("Unet", "real"), ("Unet", "augmented"), ("Unet", "no_erosion"),
                          ("FPN", "real"), ("FPN", "augmented"), ("FPN", "no_erosion")]
    fpn_no_erosion = rows[("FPN", "no_erosion")]
    vs_real, vs_full = fpn_no_erosion["vs"]
    assert vs_real["baseline"] == "FPN · real only"
    # no_erosion - real per seed: seed 0: 0.05, seed 1: 0.05 + 0.05 = 0.10
    assert vs_real["diff"]["test/dice"]["mean"] == pytest.approx(0.075)
    assert vs_full["baseline"] == "FPN · augmented (full MedDiff-FT)"
    assert vs_full["diff"]["test/dice"]["mean"] == pytest.approx(-0.075)
    assert _md_row(text, "FPN · − mask erosion")


def test_copy_sample_grid_picks_the_lowest_seed_of_the_variant(tmp_path):
    import pandas as pd

    from experiments.reporting.headlines import copy_sample_grid

    for sig in ("gen_a", "gen_b"):
        (tmp_path / "art" / "generate" / sig).mkdir(parents=True)
        (tmp_path / "art" / "generate" / sig / "grid.png").write_bytes(sig.encode())
    runs = pd.DataFrame({"tags.variant": ["real_only", "synthetic", "synthetic"], "tags.seed": ["0", "3", "1"],
                         "tags.sig_generate": [None, "gen_a", "gen_b"],
                         "params.artifacts_dir": [str(tmp_path / "art")] * 3})
    dest = copy_sample_grid({"samples": {"variant": "synthetic"}}, runs, tmp_path / "out" / "t_samples.png")
    assert dest.read_bytes() == b"gen_b"  # seed 1 before seed 3
    assert copy_sample_grid({"samples": {"variant": "copy_paste"}}, runs, tmp_path / "none.png") is None


def test_diff_cell_never_fakes_a_ci():
    from experiments.reporting.table_render import _diff_cell

    col = {"metric": "test/dice", "format": ".3f", "higher_is_better": True}
    one = {"mean": 0.1, "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 1}
    assert _diff_cell(one, col, False) == "+0.100 (n=1 pair; CI undefined)"
    worse = {"mean": 0.1, "ci95_low": 0.05, "ci95_high": 0.15, "n": 3, "significant": True, "mde80": 0.04}
    assert "(n=3; MDE 0.040)" in _diff_cell(worse, col, False)
    # a CI that excludes 0 is not bold unless the comparison survives Holm's correction
    assert "**" not in _diff_cell({**worse, "significant": False}, col, False)
    assert "▼" in _diff_cell(worse, {**col, "metric": "test/fnr", "higher_is_better": False}, False)
    assert _diff_cell(None, col, False) == "no paired seeds"


def test_a_rerun_cell_counts_once_with_its_latest_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("g", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment("g")
    for dice in (0.2, 0.5):  # the same cell finished twice (meddiffaug grid --rerun)
        _log_run(mlflow, "g", {"variant": "a", "seed": "0", "cell": "a-0"}, {"test/dice": dice})
        time.sleep(0.01)  # distinct start times (milliseconds)
    df = collect_runs("g", uri)
    assert len(df) == 1 and float(df["metrics.test/dice"].iloc[0]) == 0.5


def test_gate_note_names_the_pairs_its_rate_rests_on():
    from experiments.reporting.table_render import gate_notes

    spec = {"gate_min_real_pass": 0.8, "gate_min_real_reject": 0.8}
    row = {"label": "arm", "gate_warning": True, "metrics": {"gen/real_pass_rate": {"mean": 0.75}}}
    assert "on real validation lesion pairs < 0.80" in gate_notes(row, spec)[0]
    cross = gate_notes({**row, "gate_crossfit_folds": 4}, spec)[0]
    assert "on all labelled real lesion pairs, cross-fitted in 4 folds < 0.80" in cross
