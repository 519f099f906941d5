"""External test sets (data.external_tests): config checks, overlap refusal, center B, metrics and tracking."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from experiments.config import ConfigError, load_config

BASE = "experiments/configs/procedural_polyp_baseline.yaml"
CENTER_B = "data.external_tests=[{name: procedural_polyp, center: b, n: 6}]"


@pytest.mark.parametrize("value, words", [
    ("[procedural_polyp]", ["data.external_tests[0]", "mapping"]),
    ("[{name: procedural_polyp, centre: b}]", ["unknown key 'centre'", "center"]),
    ("[{name: cvc_clinic, root: /x}]", ["data.external_tests[0].name", "cvc_clinicdb"]),
    ("[{name: procedural_polyp}]", ["data.external_tests[0].center", "center: b"]),
    ("[{name: procedural_polyp, center: a}]", ["center: b"]),
    ("[{name: procedural_polyp, center: b, root: /x}]", ["remove root"]),
    ("[{name: procedural_polyp, center: b, n: 0}]", ["data.external_tests[0].n", ">= 1"]),
    ("[{name: cvc_clinicdb}]", ["data.external_tests[0]", "needs root"]),
    ("[{name: cvc_clinicdb, root: /x, center: b}]", ["center and n are for procedural"]),
    ("[{name: kvasir_seg, root: /x, classes: [bg, polyp]}]", ["classes", "name: folder"]),
    ("[{name: procedural_polyp, center: b, label: 'a b'}]", ["label", "letters, digits"]),
    ("[{name: cvc_clinicdb, root: /x}, {name: folder, root: /y, label: cvc_clinicdb}]", ["both labelled 'cvc_clinicdb'"]),
])
def test_bad_entries_name_the_entry_and_what_to_do(value, words):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [f"data.external_tests={value}"])
    for word in words:
        assert word in str(err.value)


def test_default_keeps_every_signature_and_external_sets_change_only_segment():
    from experiments.runner.pipeline import signatures, stage_inputs

    diffaug = "experiments/configs/procedural_polyp_diffaug.yaml"
    plain, with_b = load_config(diffaug), load_config(diffaug, [CENTER_B])
    assert "external_tests" not in json.dumps(stage_inputs(plain, "segment"))
    before, after = signatures(plain), signatures(with_b)
    assert {s: before[s] for s in ("finetune", "generate", "validate")} == \
           {s: after[s] for s in ("finetune", "generate", "validate")}
    assert before["segment"] != after["segment"]
    labels = [e["label"] for e in stage_inputs(with_b, "segment")["external_tests"]]
    assert labels == ["procedural_polyp_center_b"]


# ---------------------------------------------------------------- overlap with the run's own data
def _folder_run(tmp_path, main_root, external_root):
    from experiments.runner.pipeline import build_datamodule

    cfg = load_config(BASE, ["data.name=folder", f"data.root={main_root}", "data.image_size=16", "data.n_real=null",
                             "data.val_fraction=0.2", "data.test_fraction=0.2", f"data.cache_dir={tmp_path}/cache",
                             f"output_dir={tmp_path}/out", f"data.external_tests=[{{name: folder, root: {external_root}}}]"])
    return cfg, build_datamodule(cfg)


def test_a_set_sharing_training_images_is_refused_naming_them(tmp_path, make_dataset):
    from datamodules.errors import DataError
    from experiments.runner.external_tests import external_sets

    main_root = make_dataset("folder")
    copy = tmp_path / "copy"
    shutil.copytree(main_root, copy)
    (copy / "images" / "case0.png").rename(copy / "images" / "renamed0.png")  # same content, other stem
    (copy / "masks" / "case0.png").rename(copy / "masks" / "renamed0.png")
    cfg, dm = _folder_run(tmp_path, main_root, copy)
    with pytest.raises(DataError) as err:
        external_sets(cfg, dm)
    text = str(err.value)
    trained = sorted({i for s in ("train", "train_few", "val") for i in dm.split_ids.get(s, [])})
    assert "folder_copy" in text and "same image content" in text
    assert f"shares {len(trained)} of its 8 images" in text  # every training pair, none of the test split
    from datamodules.external import load_external_set, training_overlap

    overlap = training_overlap(load_external_set("folder", "copy", 16, root=str(copy)), dm)
    assert sorted(run_id for _, run_id, _ in overlap) == trained
    assert f"{overlap[0][0]} = {overlap[0][1]} ({overlap[0][2]})" in text
    assert all(e == r for e, r, _ in overlap if e != "renamed0")
    assert ("case0" in trained) == any(e == "renamed0" and r == "case0" for e, r, _ in overlap)  # found by content


def test_run_stops_on_an_overlapping_set_before_any_mlflow_run(tmp_path, make_dataset, capsys, monkeypatch):
    from sweeps.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = make_dataset("folder")
    code = main(["run", BASE, "data.name=folder", f"data.root={root}", "data.image_size=16", "data.n_real=null",
                 "data.val_fraction=0.2", "data.test_fraction=0.2", f"data.cache_dir={tmp_path}/cache",
                 f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/a", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                 f"data.external_tests=[{{name: folder, root: {root}, label: same}}]"])
    assert code == 2
    assert "external test set 'same'" in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "a").exists()


def test_same_stems_with_other_content_are_not_an_overlap(tmp_path, make_dataset):
    from PIL import Image

    from experiments.runner.external_tests import external_sets

    main_root = make_dataset("folder")
    other = make_dataset("folder")
    for path in (other / "images").glob("*.png"):  # other pixels under the same file names
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    cfg, dm = _folder_run(tmp_path, main_root, other)
    (ext,) = external_sets(cfg, dm)
    assert ext.label == "folder_" + other.name and len(ext.ids) == 8 and ext.images.shape == (8, 16, 16, 3)
    assert external_sets(cfg, dm)[0] is ext  # loaded once per datamodule


def test_cross_dataset_kvasir_to_cvc_on_tiny_layouts(tmp_path, make_dataset):
    """The cross-dataset protocol: train on Kvasir-SEG, test on all of CVC-ClinicDB; the root enters by content."""
    from experiments.runner.external_tests import external_sets
    from experiments.runner.pipeline import build_datamodule, stage_inputs

    kvasir, cvc = make_dataset("kvasir_seg"), make_dataset("cvc_clinicdb")
    moved = shutil.copytree(cvc, tmp_path / "elsewhere", copy_function=shutil.copy2)  # same files, other mount

    def config(root):
        return load_config("experiments/configs/kvasir_seg_baseline.yaml", [
            f"data.root={kvasir}", "data.image_size=16", "data.n_real=null", "data.num_workers=0",
            f"data.cache_dir={tmp_path}/cache", f"output_dir={tmp_path}/out",
            f"data.external_tests=[{{name: cvc_clinicdb, root: {root}}}]"])

    cfg = config(cvc)
    (ext,) = external_sets(cfg, build_datamodule(cfg))
    assert ext.label == "cvc_clinicdb" and len(ext.ids) == 14 and ext.masks.max() == 1  # every frame, no split
    assert ext.source.startswith("file://")
    item = stage_inputs(cfg, "segment")["external_tests"][0]
    assert item["root"].startswith("content:") and item == stage_inputs(config(moved), "segment")["external_tests"][0]


# ---------------------------------------------------------------- center B
def _digests(images):
    return {hashlib.sha256(im.tobytes()).hexdigest() for im in images}


@pytest.mark.parametrize("kind", ["polyp", "skin", "fundus", "ultrasound"])
def test_center_b_is_deterministic_disjoint_and_extends(kind):
    from datamodules.procedural import render_procedural, render_test_pool
    from datamodules.procedural_center_b import render_center_b

    images, masks = render_center_b(kind, 6, 32)
    assert images.shape == (6, 32, 32, 3) and masks.shape == (6, 32, 32) and images.dtype == np.uint8
    render_center_b.cache_clear()
    again = render_center_b(kind, 6, 32)
    np.testing.assert_array_equal(images, again[0])
    np.testing.assert_array_equal(masks, again[1])
    bigger = render_center_b(kind, 9, 32)
    np.testing.assert_array_equal(images, bigger[0][:6])
    pools = [render_test_pool(kind, 20, 32)[0], render_procedural(kind, 20, 32, seed=0)[0],
             render_procedural(kind, 20, 32, seed=0, stream="normal")[0]]
    assert not _digests(images) & set().union(*map(_digests, pools))


@pytest.mark.parametrize("kind", ["polyp", "skin", "fundus", "ultrasound"])
def test_center_b_is_shifted(kind):
    """Colour, contrast and the share of large-lesion frames all differ from center A's test pool."""
    from datamodules.procedural_center_b import ACQUISITIONS, describe_shift

    shift = describe_shift(kind, n=120, size=32)
    a, b = shift["a"], shift["b"]
    assert max(abs(x - y) for x, y in zip(a["mean_rgb"], b["mean_rgb"])) > 0.01
    assert b["contrast"] < a["contrast"] - 0.01  # every acquisition flattens contrast and blurs
    assert ACQUISITIONS[kind].large_keep < 1


def test_center_a_renders_as_before():
    """Center B lives in its own module: center A's pools are byte-identical to the committed ones."""
    from datamodules.procedural import render_procedural, render_test_pool

    test_images, test_masks = render_test_pool("polyp", 3, 32)
    train_images, _, _ = render_procedural("skin", 3, 32, seed=5)
    digest = hashlib.sha256(test_images.tobytes() + test_masks.tobytes() + train_images.tobytes()).hexdigest()
    assert digest[:16] == "2bb23068b56db2d8"


# ---------------------------------------------------------------- metrics and tracking
def _center_b_set(n=6, size=32):
    from datamodules.external import load_external_set

    return load_external_set("procedural_polyp", "procedural_polyp_center_b", size, center="b", n=n)


def test_external_metrics_are_the_test_metrics_under_the_sets_prefix(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from experiments.stages.segment import evaluate_external
    from lightning_modules.segmenter import SegmenterModule

    ext = _center_b_set()
    module = SegmenterModule(num_classes=2, encoder_depth=3, decoder_channels=[16, 8, 4])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = evaluate_external(trainer, module, [ext], None, 3, tmp_path)
    assert module.test_prefix == "test"
    for key in ("dice", "iou", "fnr_small", "fnr", "n_small"):
        assert f"test/procedural_polyp_center_b/{key}" in out
    trainer.test(module, dataloaders=DataLoader(ext.dataset(), batch_size=3), verbose=False)
    same = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    assert out["test/procedural_polyp_center_b/dice"] == pytest.approx(same["test/dice"], abs=1e-6)
    assert out["test/procedural_polyp_center_b/fnr_small"] == pytest.approx(same["test/fnr_small"], nan_ok=True)
    assert (tmp_path / "predictions_procedural_polyp_center_b.png").is_file()


def test_external_set_is_logged_as_a_dataset_input_with_context_external(tmp_path, monkeypatch):
    import mlflow

    from experiments.tracking import log_data_inputs
    from fakes import FakeDataModule

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(BASE, [])
    ext = _center_b_set()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run(experiment_id=mlflow.create_experiment("inputs")) as run:
        log_data_inputs(cfg, FakeDataModule(cfg), [ext])
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert by_context["external"].name == "procedural_polyp_center_b"
    assert by_context["external"].digest == ext.digest and "center=b" in by_context["external"].source


def test_verdict_says_when_a_configured_set_has_no_dice():
    from experiments.runner.run_verdict import run_verdicts

    cfg = load_config(BASE, [CENTER_B])
    metrics = {"test/dice": 0.5, "val/dice": 0.5, "seg/collapsed": 0.0}
    _, caveats = run_verdicts(cfg, metrics)
    assert any("procedural_polyp_center_b" in c and "not measured" in c for c in caveats)
    _, caveats = run_verdicts(cfg, {**metrics, "test/procedural_polyp_center_b/dice": 0.3})
    assert not [c for c in caveats if "procedural_polyp_center_b" in c]


@pytest.mark.slow
def test_run_with_center_b_logs_external_metrics_and_keeps_selection(tmp_path, capsys, monkeypatch):
    """End to end: the external set adds test/<set>/* and changes nothing the run trained or selected."""
    import mlflow

    from sweeps.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tiny = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.n_procedural=40", "data.image_size=32",
            "data.batch_size=4", "data.n_real=8", "data.test_pool=6", "segmenter.collapse_dice=0",
            f"data.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.artifact_root={tmp_path}/mlruns"]
    outs = []
    for name, extra in (("plain", []), ("external", [CENTER_B])):
        args = ["run", BASE, *tiny, *extra, f"artifacts_dir={tmp_path}/{name}/a", f"output_dir={tmp_path}/{name}/o"]
        assert main(args) == 0
        text = capsys.readouterr().out
        outs.append(json.loads(text[text.rindex("\n{") + 1:])["metrics"])
    plain, external = outs
    for key in ("val/dice", "test/dice", "test/iou", "seg/best_epoch"):
        assert external[key] == pytest.approx(plain[key], abs=1e-6)  # never trained, validated or selected on
    assert {"test/procedural_polyp_center_b/dice", "test/procedural_polyp_center_b/iou",
            "test/procedural_polyp_center_b/fnr_small"} <= set(external)
    assert not [k for k in plain if "center_b" in k]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["procedural_polyp_baseline"])
    logged = runs[runs["metrics.test/procedural_polyp_center_b/dice"].notna()]
    assert len(logged) == 1
    inputs = mlflow.get_run(logged.iloc[0]["run_id"]).inputs.dataset_inputs
    contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context") for i in inputs}
    assert contexts == {"train_few", "val", "test", "external"}


# ---------------------------------------------------------------- data inspect
def test_inspect_shows_a_center_b_grid_and_what_shifted(tmp_path, capsys):
    from PIL import Image

    from datamodules.inspect import main

    grid = tmp_path / "b.png"
    assert main(["--dataset", "procedural_skin", "--center", "b", "--grid", str(grid), "--image-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["center"] == "b" and out["n_pairs"] == 200 and set(out["shift"]) == {"a", "b"}
    assert Image.open(grid).size == (16 * 32, 2 * 32)  # 16 samples: images over their mask outlines
    assert main(["--dataset", "procedural_skin", "--grid", str(tmp_path / "a.png"), "--image-size", "32"]) == 0
    assert "center a" in capsys.readouterr().out and (tmp_path / "a.png").is_file()
    assert main(["--dataset", "procedural_skn", "--center", "b"]) == 1
    assert "procedural_<polyp|fundus|skin|ultrasound>" in capsys.readouterr().err
    assert main(["--dataset", "kvasir_seg"]) == 1
    assert "--root is required for kvasir_seg" in capsys.readouterr().err


# ---------------------------------------------------------------- benchmarks.external_shift
def test_shift_benchmark_pairs_the_gap_by_seed_and_draws_both_centers(tmp_path):
    from PIL import Image

    from benchmarks.external_shift import main, summarise

    rows = [{"dice_a": a, "dice_b": b, "collapsed": False} for a, b in ((0.8, 0.6), (0.7, 0.55), (0.9, 0.65))]
    out = summarise("skin", rows)
    assert out["gap"] == pytest.approx(0.2, abs=1e-4) and out["n_seeds"] == 3
    assert out["gap_ci95"][0] < 0.2 < out["gap_ci95"][1]
    (path,) = main(["--kinds", "ultrasound", "--pictures", str(tmp_path)])
    assert Image.open(path).size == (8 * 64, 4 * 64 + 4)  # center A's images and outlines over center B's
