"""Ablation grids with fake stages: cells, signatures, seed pairing, dry-run, partial reruns."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

import fakes as fake_stages
from experiments.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write_grid(tmp_path: Path, **changes) -> Path:
    """A 2 variants x 2 ratios x 2 seeds grid whose MLflow store and artifacts live in tmp_path."""
    spec = {"name": "t_grid", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"],
            "axes": {"augment.ratio": [1, 3]},
            "variants": {"gated": ["validator.mode=single_step"], "unfiltered": ["validator.mode=none"]},
            "seeds": [0, 1], "tags": {"table": "t"}}
    spec.update(changes)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def grid_runs(tmp_path: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["t_grid"], output_format="list")


def test_cells_product_signatures_and_seed_pairing(tmp_path):
    from sweeps.grid import grid_cells

    cells = grid_cells(write_grid(tmp_path))
    assert len(cells) == 8 and len({c.sig for c in cells}) == 8
    assert [c.sig for c in grid_cells(write_grid(tmp_path))] == [c.sig for c in cells]  # stable
    assert [c.seed for c in cells] == [0] * 4 + [1] * 4  # seeds outermost
    for cell in cells:
        cfg = cell.config()
        assert cfg.seed == cfg.data.split_seed == cfg.augment.seed == cfg.generation.seed == cell.seed
        assert cfg.augment.ratio == cell.axes["augment.ratio"]
        assert cell.tags["grid"] == "t_grid" and cell.tags["cell"] == cell.sig and cell.tags["table"] == "t"
        assert cell.tags["axis.augment.ratio"] == str(cell.axes["augment.ratio"])
    modes = {(c.variant, c.config().validator.mode) for c in cells}
    assert modes == {("gated", "single_step"), ("unfiltered", "none")}


def test_variant_axes_replace_grid_axes(tmp_path):
    from sweeps.grid import grid_cells

    variants = {"real": ["augment.method=standard"],
                "ablation": {"overrides": ["validator.erode_px=0"], "axes": {"augment.ratio": [3]}}}
    cells = grid_cells(write_grid(tmp_path, variants=variants, seeds=[0]))
    assert Counter(c.variant for c in cells) == {"real": 2, "ablation": 1}


@pytest.mark.parametrize("change, needle", [
    ({"axis": {"augment.ratio": [1]}}, "axis"),
    ({"axes": {"augment.rati": [1]}}, "augment.rati"),
    ({"variants": {"bad": ["validator.mod=none"]}}, "validator.mod"),
    ({"seed_keys": ["data.seed"]}, "data.seed"),
    ({"axes": {"augment.ratio": []}}, "non-empty"),
    ({"overrides": "seed=1"}, "list of key=value"),
    ({"seeds": [0, "one"]}, "integers"),
])
def test_bad_grid_files_fail_before_running(tmp_path, change, needle):
    from sweeps.grid import grid_cells

    with pytest.raises(ConfigError, match=needle):
        grid_cells(write_grid(tmp_path, **change))


def test_dry_run_then_partial_then_full_rerun(tmp_path, fakes, capsys):
    from sweeps.grid import main

    path = str(write_grid(tmp_path))
    assert main([path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo") == 8 + 1 and "8 cells: 0 done, 0 running, 0 waiting, 0 retried, 0 failed, 8 todo" in out
    assert not fakes.exists()  # the dry run ran nothing

    assert main([path, "--only", "variant=gated", "--only", "seed=0"]) == 0
    assert fake_stages.calls(fakes, "segment") == 2
    assert fake_stages.calls(fakes, "finetune") == 1  # both ratios share the fine-tune
    main([path, "--dry-run"])
    out = capsys.readouterr().out
    assert "8 cells: 2 done, 0 running, 0 waiting, 0 retried, 0 failed, 6 todo" in out
    assert "left at 1 worker (median of 2 finished cells)" in out  # the queue timed the 2 cells

    assert main([path]) == 0  # only the 6 missing cells run
    assert fake_stages.calls(fakes, "segment") == 8
    assert fake_stages.calls(fakes, "finetune") == 2  # one per seed: the split differs
    runs = [r for r in grid_runs(tmp_path) if r.info.status == "FINISHED"]
    assert len(runs) == 8 and len({r.data.tags["cell"] for r in runs}) == 8
    tags = runs[0].data.tags
    assert {"grid", "cell", "variant", "seed", "axis.augment.ratio", "table"} <= set(tags)
    assert main([path]) == 0 and fake_stages.calls(fakes, "segment") == 8  # nothing left to do

    # --rerun logs the selected cells again; unchanged stages come from the cache
    assert main([path, "--rerun", "--only", "variant=gated", "--only", "seed=0"]) == 0
    assert fake_stages.calls(fakes, "segment") == 8
    runs = [r for r in grid_runs(tmp_path) if r.info.status == "FINISHED"]
    assert len(runs) == 10 and len({r.data.tags["cell"] for r in runs}) == 8


def test_failed_cell_does_not_stop_the_grid_and_reruns(tmp_path, fakes, monkeypatch):
    from sweeps.grid import main

    path = str(write_grid(tmp_path, variants={"gated": []}, seeds=[0]))
    monkeypatch.setenv("FAKE_SEGMENT_FAIL_RATIO", "1")
    assert main([path]) == 1
    assert [r.info.status for r in grid_runs(tmp_path)].count("FINISHED") == 1
    monkeypatch.delenv("FAKE_SEGMENT_FAIL_RATIO")
    assert main([path]) == 0
    assert fake_stages.calls(fakes, "segment") == 2  # only the failed cell ran again


def test_only_filters_and_rejects_unknown_keys(tmp_path):
    from sweeps.grid import grid_cells, select

    cells = grid_cells(write_grid(tmp_path))
    assert len(select(cells, ["augment.ratio=3.0"])) == 4
    assert len(select(cells, ["seed=1", "variant=gated", "variant=unfiltered"])) == 4
    with pytest.raises(ConfigError, match="colour"):
        select(cells, ["colour=red"])


@pytest.mark.parametrize("name, n_cells", [("ablation_main", 36), ("diffaug_main", 60), ("meddiff_ft", 36), ("demo", 9), ("msdm", 10),
                                           ("headline200_polyp", 92), ("headline200_skin", 144),
                                           ("headline200_fundus", 80), ("headline200_ultrasound", 80)])
def test_shipped_grids_resolve(name, n_cells):
    from sweeps.grid import grid_cells

    cells = grid_cells(REPO / "sweeps" / "grids" / f"{name}.yaml")
    assert len(cells) == n_cells


def test_a_grid_that_extends_a_base_has_the_cells_of_the_flat_grid(tmp_path):
    """``extends``: the base's overrides come first, the grid's own win; tags merge; the cells (and so
    the records that count them as done) are those of the same grid written out flat."""
    from sweeps.grid import grid_cells

    flat = write_grid(tmp_path)
    spec = yaml.safe_load(flat.read_text())
    base = {k: v for k, v in spec.items() if k not in ("name", "seeds")}
    base["overrides"] = spec["overrides"] + ["augment.seed=99"]  # overridden below by the seed key
    base["tags"] = {"table": "t", "block": "b"}
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "base.yaml").write_text(yaml.safe_dump(base))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"name": "t_grid", "extends": "bases/base.yaml", "seeds": [0, 1],
                                     "tags": {"block": "own"}}))
    want, got = grid_cells(flat), grid_cells(child)
    assert [c.sig for c in got] == [c.sig for c in want] and len(got) == 8
    assert got[0].tags["block"] == "own" and got[0].tags["table"] == "t"
    child.write_text(yaml.safe_dump({"name": "t_grid", "extends": "bases/base.yaml", "colour": "red"}))
    with pytest.raises(ConfigError, match="colour"):
        grid_cells(child)


@pytest.mark.slow
@pytest.mark.parametrize("grid", ["headline_polyp", "headline_skin", "headline_fundus", "headline_ultrasound",
                                  "data_efficiency"])
def test_committed_records_count_every_block_cell_as_done(grid, capsys, monkeypatch):
    """No change of a stage signature or a grid file leaves a committed block cell to be rerun."""
    from sweeps.grid import main

    monkeypatch.setenv("MEDDIFFAUG_RECORDS_DIR", str(REPO / "sweeps" / "records"))  # read only: a dry run

    assert main([str(REPO / "sweeps" / "grids" / f"{grid}.yaml"), "--dry-run"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    total, done = (int(x) for x in re.search(r"(\d+) cells: (\d+) done", summary).groups())
    assert total == done, summary
