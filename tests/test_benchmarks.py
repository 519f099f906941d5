"""Benchmarks run end to end on tiny settings and print parseable JSON lines."""
from __future__ import annotations

import json


def test_base_cost_measures_every_base_against_the_first(capsys):
    from benchmarks.base_cost import main

    rows = main(["--bases", "tiny", "tiny", "--samples", "2", "--batch-size", "2", "--steps", "2", "--repeats", "1"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == rows and len(rows) == 3
    assert all(r["samples_per_s"] > 0 and r["unet_params"] > 0 for r in rows[:2])
    assert rows[2]["reference"] == "tiny" and rows[2]["cost_ratio"]["tiny"] > 0


def test_base_cost_names_a_missing_base_and_how_to_make_it(tmp_path):
    import pytest

    from benchmarks.base_cost import main

    with pytest.raises(SystemExit, match=r"does not exist.*meddiffaug pretrain --width large"):
        main(["--bases", "tiny", str(tmp_path / "no_base")])


def test_lesion_fidelity_rejects_a_folder_without_manifest_before_training(tmp_path):
    import pytest

    from benchmarks.lesion_fidelity import main

    with pytest.raises(SystemExit, match=r"--generate-dir: manifest .*no_gen.*does not exist"):
        main(["--generate-dir", str(tmp_path / "no_gen")])
