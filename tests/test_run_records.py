"""Run records: a grid exports each finished cell; tables from the records equal tables from MLflow."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import fakes as fake_stages
from experiments.config import ConfigError
from experiments.reporting import run_records as rr

TABLE = {"title": "t", "grid": "t_grid", "rows": {"by": "variant", "order": ["real", "diffusion", "copy_paste"]},
         "columns": [{"metric": "test/dice", "name": "Dice", "format": ".3f", "higher_is_better": True, "ci": True}],
         "baseline": ["real", "copy_paste"], "compare": ["test/dice"], "headline": True,
         "headline_rows": {"real_only": "real", "augmented": "diffusion", "copy_paste": "copy_paste"},
         "notes": "Diffusion vs real: {diff.dice.diffusion.real.mean:+.4f} {diff.dice.diffusion.real.ci:+.4f} "
                  "({diff.dice.diffusion.real.holm}); real {dice.real.mean:.3f}, {n_seeds} seeds."}


def _grid(tmp_path: Path) -> Path:
    spec = {"name": "t_grid", "base_config": "experiments/configs/procedural_polyp_diffaug.yaml",
            "overrides": [f"output_dir={tmp_path}/out", f"artifacts_dir={tmp_path}/artifacts",
                          f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"],
            "variants": {"real": ["augment.method=standard"], "diffusion": ["augment.method=diffusion"],
                         "copy_paste": ["augment.method=copy_paste"]},
            "seeds": [0, 1]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_export_then_table_is_byte_identical_to_mlflow(tmp_path, fakes, monkeypatch, capsys):
    from experiments.reporting.table_cli import main as table
    from sweeps.grid import main as grid

    assert grid([str(_grid(tmp_path))]) == 0
    records = Path(rr.records_dir()) / "t_grid.jsonl"
    lines = records.read_text().splitlines()
    assert len(lines) == 6  # one line per finished cell
    record = json.loads(lines[0])
    assert {"grid", "cell", "seed", "variant", "run_id", "start_time", "git_sha", "tags", "params", "metrics",
            "sigs"} <= set(record)
    assert record["sigs"]["segment"] == record["tags"]["sig"] and "test/dice" in record["metrics"]
    assert not any(k.startswith("tracking.") for k in record["params"])

    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump(TABLE, allow_unicode=True))
    outputs = {}
    for source, extra in (("mlflow", ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--no-log"]),
                          ("records", ["--runs", str(records)])):
        folder = tmp_path / f"from_{source}"
        folder.mkdir()
        monkeypatch.chdir(folder)  # the same relative output names: the command in results.md is the same
        assert table([str(spec), "--write", "results.md", "--json", "results.json"] + extra) == 0
        outputs[source] = ((folder / "results.md").read_bytes(), (folder / "results.json").read_bytes())
    assert outputs["mlflow"] == outputs["records"]
    text = outputs["records"][0].decode()
    assert "Diffusion vs real: " in text and "{" not in text.split("Diffusion vs real")[1]
    first = text.splitlines()[0]  # the command shown leaves out where the runs came from
    assert "--runs" not in first and "--tracking-uri" not in first and "--write results.md" in first

    # a fresh machine: no MLflow store, no stage cache; exported cells are done and not rerun
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    (tmp_path / "mlflow.db").unlink()
    before = fake_stages.calls(fakes, "segment")
    capsys.readouterr()
    assert grid([str(tmp_path / "grid.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 cells: 6 done" in out and "0 todo" in out
    assert grid([str(tmp_path / "grid.yaml")]) == 0
    assert fake_stages.calls(fakes, "segment") == before


def _record(cell: str, run_id: str, start: int, dice: float) -> dict:
    return rr.make_record("g", cell, run_id, start, "FINISHED", {"grid": "g", "cell": cell, "seed": "0", "sig": "s"},
                          {"data.n_real": "16", "tracking.uri": "sqlite:///x"}, {"test/dice": dice, "x": float("nan")})


def test_a_cell_exported_twice_appears_once_and_the_latest_run_wins(tmp_path):
    path = tmp_path / "g.jsonl"
    rr.write_record(_record("a", "r1", 100, 0.5), path)
    rr.write_record(_record("a", "r1", 100, 0.5), path)  # the same run again: no change
    rr.write_record(_record("b", "r2", 110, 0.6), path)
    assert len(path.read_text().splitlines()) == 2
    rr.write_record(_record("a", "r3", 200, 0.7), path)  # a rerun of cell a replaces it
    rr.write_record(_record("a", "r0", 50, 0.1), path)  # an older run never does
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["cell"], r["run_id"]) for r in lines] == [("b", "r2"), ("a", "r3")]
    assert lines[1]["metrics"] == {"test/dice": 0.7, "x": None}  # strict JSON
    assert "tracking.uri" not in lines[1]["params"]
    # a union merge of two branches leaves duplicate cells: readers keep the latest
    with open(path, "a") as handle:
        handle.write(json.dumps(_record("b", "r9", 300, 0.9)) + "\n")
    latest = {r["cell"]: r["run_id"] for r in rr.read_records([tmp_path])}
    assert latest == {"a": "r3", "b": "r9"}
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*lock"))


def test_bad_records_name_the_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(_record("a", "r1", 1, 0.5)) + "\nnot json\n")
    with pytest.raises(ConfigError, match=r"g.jsonl:2 is not a run record"):
        rr.read_records([path])
    with pytest.raises(ConfigError, match="do not exist"):
        rr.read_records([tmp_path / "missing.jsonl"])


def test_recorded_cells_are_done_only_at_the_current_signature_with_the_final_metric(tmp_path):
    from sweeps.finished import done_in_records

    path = tmp_path / "g.jsonl"
    rr.write_record(_record("a", "r1", 1, 0.5), path)
    rr.write_record(rr.make_record("g", "b", "r2", 2, "FINISHED", {"sig": "s"}, {}, {"other": 1.0}), path)
    assert [r["cell"] for r in rr.finished_records("g", path)] == ["a", "b"]  # the records module only reads
    assert done_in_records("g", {"a": ("segment", "s", "test/dice")}, path) == {"a": "r1"}
    assert done_in_records("g", {"a": ("segment", "new", "test/dice")}, path) == {}  # a stage changed
    assert done_in_records("g", {"b": ("segment", "s", "test/dice")}, path) == {}  # no final metric


def _committed(repo: Path, path: str):
    """A file as last committed, or None when this checkout's HEAD lacks it: a grid running in the
    checkout appends to sweeps/records/ between commits, and this test is about what the repository
    holds. Outside git, the file itself."""
    shown = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], capture_output=True)
    if shown.returncode == 0:
        return shown.stdout
    in_git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    return None if in_git else (repo / path).read_bytes()


GENERATED = "<!-- generated by meddiffaug table "
REPO = Path(__file__).resolve().parents[1]
# results.md and every archived block's tables that its records regenerate (an archive kept verbatim,
# whose first line says so, is not one of them)
RESULTS = sorted(p.stem for p in REPO.glob("results*.md") if p.read_text().startswith(GENERATED))


def _regenerate(repo: Path, tmp_path: Path, perturb=None, name: str = "results") -> None:
    """Run the command on ``<name>.md``'s first line over the committed records (optionally perturbed),
    in ``tmp_path`` (the caller's working directory)."""
    from experiments.reporting.table_cli import main as table

    first = _committed(repo, f"{name}.md").decode().splitlines()[0]
    assert first.startswith(GENERATED) and first.endswith(" ; do not edit -->")
    args = first[len(GENERATED):-len(" ; do not edit -->")].split()
    (tmp_path / "experiments").symlink_to(repo / "experiments")  # the same relative names as in the repository
    records = tmp_path / "sweeps" / "records"
    records.mkdir(parents=True)
    for path in sorted((repo / "sweeps" / "records").glob("*.jsonl")):
        content = _committed(repo, f"sweeps/records/{path.name}")
        if content is None:  # a grid's first records, not yet committed, are not the repository's
            continue
        if perturb is not None:
            lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
            content = "".join(json.dumps(perturb(r)) + "\n" for r in lines).encode()
        (records / path.name).write_bytes(content)
    assert table(args + ["--runs", "sweeps/records"]) == 0


def _assert_same_numbers(got, want, where="results.json"):
    """Equal structure and text; numbers equal to 6 significant digits (the file's precision)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            _assert_same_numbers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_numbers(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), where
    else:
        assert got == want, where


def _assert_regenerated(repo: Path, tmp_path: Path, name: str = "results") -> None:
    assert (tmp_path / f"{name}.md").read_text() == _committed(repo, f"{name}.md").decode(), \
        f"{name}.md: run `make results` and commit"
    _assert_same_numbers(json.loads((tmp_path / f"{name}.json").read_text()),
                         json.loads(_committed(repo, f"{name}.json")), f"{name}.json")


def test_results_md_is_among_the_regenerated_files():
    assert "results" in RESULTS


@pytest.mark.parametrize("name", RESULTS)
def test_committed_results_regenerate_from_committed_records(name, tmp_path, monkeypatch):
    """results.md (as text) and results.json (numbers to their published precision) in the repository,
    and each archived block's pair, are what ``make results`` builds from sweeps/records/: the command
    is read from the file's first line."""
    monkeypatch.chdir(tmp_path)
    _regenerate(REPO, tmp_path, name=name)
    _assert_regenerated(REPO, tmp_path, name)


@pytest.mark.parametrize("name", RESULTS)
def test_committed_results_survive_a_one_ulp_change_of_every_metric(name, tmp_path, monkeypatch):
    """Another CPU may round the last bit of a metric differently: moving every metric of every record
    up by one ulp still rebuilds the committed files."""
    repo = REPO
    monkeypatch.chdir(tmp_path)

    def one_ulp(record):
        record["metrics"] = {k: float(np.nextafter(v, np.inf)) if isinstance(v, float) else v
                             for k, v in record["metrics"].items()}
        return record

    _regenerate(repo, tmp_path, one_ulp, name)
    _assert_regenerated(repo, tmp_path, name)