"""benchmarks.gate_trust: held-out truth from a reserved stream, summaries over seeds, its JSON lines."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.gate_trust import main, mean_ci, summarize
from benchmarks.gate_trust_run import heldout_pairs
from datamodules.procedural import render_procedural


def test_heldout_pairs_hold_lesions_and_none_of_the_runs_content():
    images, masks = heldout_pairs("skin", 12, 32, seed=5)
    assert images.shape == (12, 3, 32, 32) and masks.shape == (12, 32, 32)
    assert bool(masks.flatten(1).gt(0).any(1).all())
    own, _, _ = render_procedural("skin", 40, 32, 5)  # the run's own content of the same seed
    held = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert not any(np.array_equal(h, o) for h in held for o in own)


def test_mean_ci_is_the_t_interval_over_seeds():
    mean, half = mean_ci([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and half == pytest.approx(4.3027 * 0.2 / 3 ** 0.5, rel=1e-4)
    assert np.isnan(mean_ci([0.4])[1])


def test_summary_compares_the_in_run_check_with_the_truth():
    def run(in_pass, held_pass, flagged):
        rates = {"misplaced_reject_rate": 1.0, "missing_reject_rate": 0.5, "n_lesion_pairs": 14.0}
        return {"in_run": {**rates, "real_pass_rate": in_pass}, "heldout": {**rates, "real_pass_rate": held_pass},
                "theta": 0.3, "flagged": flagged}

    row = summarize("polyp", "prompted", [run(0.9, 0.7, False), run(0.5, 0.6, True)], heldout=200)
    assert row["selfcheck_error"] == pytest.approx(0.15) and row["flagged_share"] == pytest.approx(0.5)
    assert row["real_pass_rate"] == pytest.approx(0.65) and row["missing_reject_rate"] == pytest.approx(0.5)
    assert row["seeds"] == 2 and row["n_real"] == 16 and row["heldout_pairs"] == 200


@pytest.mark.slow
def test_benchmark_prints_one_line_per_modality_and_gate(capsys, tmp_path, monkeypatch):
    argv = ["--modalities", "fundus", "--seeds", "300", "301", "--heldout", "8", "--gates", "plain", "pasted",
            "--folds", "2", "--records", str(tmp_path), "validator.train_steps=3", "validator.augment_copies=1"]
    rows = main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the fold validators' ensemble gets its own line; fundus has no lesion-free pool to paste into
    assert lines == rows and [r["gate"] for r in rows] == ["plain", "plain+ensemble"]
    for row in rows:
        assert row["benchmark"] == "gate_trust" and row["seeds"] == 2 and row["heldout_pairs"] == 8
        for key in ("real_pass_rate", "misplaced_reject_rate", "missing_reject_rate"):
            assert 0.0 <= row[key] <= 1.0 and row[f"{key}_ci95"] is not None
        assert 0.0 <= row["selfcheck_error"] <= 1.0 and row["flagged_share"] in (0.0, 0.5, 1.0)
    # one record per seed; a second call reads them and trains nothing
    assert sorted(p.name.split("-")[2] for p in tmp_path.glob("fundus-plain-*.json")) == ["s300", "s301"]
    capsys.readouterr()
    monkeypatch.setattr("benchmarks.gate_trust_run.judge_run", lambda *a, **k: pytest.fail("a recorded seed reran"))
    assert main(argv) == rows


def test_the_documented_table_is_the_one_the_committed_records_give(capsys):
    """docs/gate-trust.md's feature-gate table is rebuilt from benchmarks/records/gate_trust, running nothing."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    main(["--seeds", *map(str, range(300, 310)), "--gates", "features", "prompted", "--recorded-only", "--table",
          "--records", str(repo / "benchmarks" / "records" / "gate_trust")])
    table = capsys.readouterr().out.strip()
    assert table.count("\n") >= 10 and table in (repo / "docs" / "gate-trust.md").read_text()
