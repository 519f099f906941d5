"""``meddiffaug data inspect``: summary, JSON keys, and problems collected with exit code 1."""

from __future__ import annotations

import json

import numpy as np

from datamodules.inspect import inspect_dataset, main

from fakes import CVC_FRAMES, H, W, _save

KEYS = {"dataset", "n_pairs", "splits", "classes", "image_sizes", "mask_values", "lesion_area",
        "problems"}


def test_inspect_json_keys_and_counts(make_dataset, capsys):
    root = make_dataset("cvc_clinicdb")
    rc = main(["--dataset", "cvc_clinicdb", "--root", str(root), "--json", "--image-size", "8"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and KEYS <= set(out)
    assert out["n_pairs"] == len(CVC_FRAMES) and sum(out["splits"].values()) == len(CVC_FRAMES)
    assert out["classes"] == ["background", "polyp"]
    assert out["image_sizes"]["min"] == [W, H] and out["image_sizes"]["distinct"] == 1
    assert set(out["mask_values"]) == {"0", "255"}
    area = out["lesion_area"]
    assert area["n_empty"] == 0 and 0 < area["min"] <= area["median"] <= area["max"] < 1
    assert "n_lost_at_image_size" in area and out["problems"] == []


def test_inspect_refuge_raw_values_and_busi_empty(make_dataset):
    r = inspect_dataset("refuge2", make_dataset("refuge2", n=2))
    assert set(r["mask_values"]) == {"0", "128", "255"} and len(r["classes"]) == 3
    b = inspect_dataset("busi", make_dataset("busi", n=2))
    assert b["n_pairs"] == 6 and b["lesion_area"]["n_empty"] == 2


def test_broken_copy_exits_nonzero_and_lists_every_problem(make_dataset, capsys):
    root = make_dataset("kvasir_seg")
    (root / "masks" / "cju1abc.jpg").unlink()  # image without mask
    (root / "images" / "cju2abc.jpg").write_bytes(b"not a jpeg")  # unreadable image
    _save(np.zeros((5, 5), np.uint8), root / "masks" / "cju3abc.jpg")  # size mismatch
    rc = main(["--dataset", "kvasir_seg", "--root", str(root)])
    text = capsys.readouterr().out
    assert rc == 1 and "PROBLEMS (3)" in text
    for name in ("cju1abc.jpg", "cju2abc.jpg", "cju3abc.jpg"):
        assert name in text
    r = inspect_dataset("kvasir_seg", root)
    assert r["n_pairs"] == 7 and len(r["problems"]) == 3


def test_wrong_folder_and_unknown_dataset(tmp_path, capsys):
    assert main(["--dataset", "busi", "--root", str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["n_pairs"] == 0 and "benign" in out["problems"][0]
    assert main(["--dataset", "bussi", "--root", str(tmp_path)]) == 1
    assert "Did you mean 'busi'" in capsys.readouterr().err
