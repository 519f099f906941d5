"""Block 200's pre-registration: it names the files the block runs from, and no record predates it."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PREREG = "sweeps/preregistration/block200.md"
MODALITIES = ("polyp", "skin", "fundus", "ultrasound")


def test_the_grids_and_table_point_at_the_preregistration_and_run_the_seeds_it_fixes():
    text = (REPO / PREREG).read_text()
    spec = yaml.safe_load((REPO / "experiments/tables/headline_block200.yaml").read_text())
    assert spec["preregistration"] == PREREG and spec["primary"]["arm"] == "diffusion_gate"
    assert spec["headline_rows"]["diffusion"] == "diffusion_gate"  # fixed: no arm is chosen after the runs
    for modality in MODALITIES:
        grid = yaml.safe_load((REPO / f"sweeps/grids/headline200_{modality}.yaml").read_text())
        seeds = grid["seeds"]
        assert seeds == list(range(200, 200 + len(seeds)))
        assert f"{modality} 200–{seeds[-1]} ({len(seeds)})" in text, f"{modality}: seeds differ from {PREREG}"
        assert spec["grids"][modality] == grid["name"] == f"headline200_{modality}"
    assert "seed_block: \"200\"" in (REPO / "sweeps/grids/bases/headline_block200.yaml").read_text()


def _first_commit(path: str) -> str:
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", path], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[-1] if out else ""


AMENDMENT = "sweeps/preregistration/block200_amendment1.md"
AMENDED = {"fundus": AMENDMENT}  # modality -> the amendment whose commit its cells run on


def test_every_block200_record_runs_on_the_commit_that_preregistered_it():
    frozen = _first_commit(PREREG)
    for modality in MODALITIES:
        path = REPO / f"sweeps/records/headline200_{modality}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        if not records:
            continue  # nothing has run yet: nothing can predate the file
        code = _first_commit(AMENDED[modality]) if modality in AMENDED else frozen
        assert code, f"{AMENDED.get(modality, PREREG)} is not in the git history, yet {path.name} has records"
        stray = {r["git_sha"] for r in records if not code.startswith(str(r["git_sha"]))}
        assert not stray, f"{path.name}: records from {stray}, not from {code[:7]}"
        assert all(re.fullmatch(r"[0-9a-f]{7,40}", str(r["git_sha"])) for r in records)


def test_the_amendment_changes_only_what_it_says():
    frozen, amended = _first_commit(PREREG), _first_commit(AMENDMENT)
    changed = subprocess.run(["git", "diff", "--name-only", frozen, amended], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(changed) == sorted([AMENDMENT, "sweeps/grids/headline200_fundus.yaml"])
    grid = yaml.safe_load((REPO / "sweeps/grids/headline200_fundus.yaml").read_text())
    assert "data.n_normal=0" in grid["overrides"]


ANALYSIS_KEYS = ("grids", "grid_key", "summary", "preregistration", "primary", "external", "baseline", "compare",
                 "headline_rows")


def test_the_analysis_is_the_one_committed_with_the_preregistration():
    """Presentation may change after the freeze (columns, names, wording); the analysis may not: the
    table spec's comparisons, arms, family and grids equal those of the pre-registering commit."""
    path = "experiments/tables/headline_block200.yaml"
    frozen = _first_commit(PREREG)
    assert frozen, f"{PREREG} is not in the git history"
    then = yaml.safe_load(subprocess.run(["git", "show", f"{frozen}:{path}"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout)
    now = yaml.safe_load((REPO / path).read_text())
    for key in ANALYSIS_KEYS:
        assert now.get(key) == then.get(key), f"{path}: '{key}' differs from the pre-registered {frozen[:7]}"
    assert now["rows"]["by"] == then["rows"]["by"] and now["rows"]["order"] == then["rows"]["order"]


@pytest.mark.parametrize("modality", MODALITIES)
def test_power_statement_matches_its_command(modality):
    from sweeps.preregistration.power import main

    row = next(r for r in main(["--effect", "0.03", "--seeds", "20", "--family", "4",
                                          "--records", str(REPO / "sweeps" / "records")]) if r["modality"] == modality)
    line = f"| {modality} | {row['pairs_block100']} | {row['sd_diff']:.4f} | {row['power']:.3f} | " \
           f"{row['power_alpha_0.05']:.3f} | {row['seeds_for_80pct']} |"
    assert line in (REPO / PREREG).read_text()
