"""A table built from a grid that has not finished says so; a finished one is unchanged."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from experiments.reporting import run_records as rr
from experiments.reporting.completeness import interim_finding, unfinished_grids

TABLE = {"title": "t", "grid": "t_grid", "rows": {"by": "variant", "order": ["real", "copy_paste"]},
         "columns": [{"metric": "test/dice", "name": "Dice", "format": ".3f"}]}


def test_only_grids_with_defined_cells_left_are_named():
    specs = [{"sources": [("a", "g1"), ("b", "g2")]}, {"sources": [(None, "g1"), (None, "g3")]}]
    defined = {"g1": ["x", "y"], "g2": ["z"], "g3": None}.get
    finished = {"g1": ["x", "stale"], "g2": ["z"]}
    got = unfinished_grids(specs, lambda g: finished.get(g, []), defined)
    assert got == {"g1": {"finished": 1, "defined": 2}}  # a cell no longer defined does not count
    assert "`g1` 1 of 2" in interim_finding(got)[0]
    assert unfinished_grids(specs, lambda g: [], None) == {}  # nothing is claimed without the grid runner
    assert interim_finding({}) == []


def _record(cell: str, seed: int, variant: str, start: int) -> dict:
    tags = {"grid": "t_grid", "cell": cell, "seed": str(seed), "variant": variant, "sig": "s"}
    return rr.make_record("t_grid", cell, f"run{start}", start, "FINISHED", tags, {"data.n_real": "16"},
                          {"test/dice": 0.5 + 0.01 * start})


def test_the_table_command_says_which_grids_have_not_finished(tmp_path, monkeypatch):
    from sweeps.cli import main as meddiffaug
    from sweeps.grid import grid_cells

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "sweeps" / "grids" / "t_grid.yaml"
    grid.parent.mkdir(parents=True)
    grid.write_text(yaml.safe_dump({"name": "t_grid", "base_config": "../../experiments/configs/procedural_polyp_diffaug.yaml",
                                    "variants": {"real": ["augment.method=standard"],
                                                 "copy_paste": ["augment.method=copy_paste"]},
                                    "seeds": [0, 1]}))
    (tmp_path / "experiments").symlink_to(Path(__file__).resolve().parents[1] / "experiments")
    cells = grid_cells(grid)
    assert len(cells) == 4
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(TABLE))
    records = tmp_path / "records" / "t_grid.jsonl"
    args = ["table", "t.yaml", "--runs", str(records.parent), "--write", "r.md", "--json", "r.json"]
    for i, cell in enumerate(cells[:3]):
        rr.write_record(_record(cell.sig, cell.seed, cell.variant, i), records)

    assert meddiffaug(args) == 0
    assert "Interim: these grids have not finished (`t_grid` 3 of 4 cells)" in Path("r.md").read_text()
    assert json.loads(Path("r.json").read_text())["unfinished_grids"] == {"t_grid": {"finished": 3, "defined": 4}}

    rr.write_record(_record(cells[3].sig, cells[3].seed, cells[3].variant, 3), records)
    assert meddiffaug(args) == 0
    assert "Interim" not in Path("r.md").read_text()
    assert "unfinished_grids" not in json.loads(Path("r.json").read_text())


def test_a_grid_file_that_no_longer_loads_is_named_not_counted(tmp_path, monkeypatch, capsys):
    from sweeps.cli import defined_cell_ids

    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "sweeps" / "grids" / "old.yaml"
    grid.parent.mkdir(parents=True)
    grid.write_text(yaml.safe_dump({"name": "old", "base_config": "missing.yaml", "seeds": [0]}))
    assert defined_cell_ids("old") is None and defined_cell_ids("absent") is None
    assert "sweeps/grids/old.yaml does not load" in capsys.readouterr().err


def test_each_grid_is_read_once_per_table_command(monkeypatch):
    from experiments.reporting import sources

    calls = []
    monkeypatch.setattr(sources, "collect_runs", lambda grid, uri, filter, records: calls.append(grid) or
                        pd.DataFrame({"tags.cell": ["c"]}))
    fetch = sources.memo_collect_runs(None, [])
    first = fetch("g", None)
    first["tags.cell"] = ["changed"]  # a caller's frame is its own
    assert list(fetch("g", None)["tags.cell"]) == ["c"] and calls == ["g"]
    fetch("g", {"variant": "real"})
    assert calls == ["g", "g"]  # another filter is another read
