"""The validate stage reads generated samples a batch at a time: row views, and what the stage holds."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import datamodules.synthetic as synthetic
from datamodules.io import read_mask
from datamodules.rows import LazyRows
from experiments.config import load_config
from experiments.stages.validate import run_validate
from experiments.stages.validate.gate import LATENT_BATCH
from lightning_modules.gating.quality import pixel_stat_features

from fakes import FakeDiffusion, OracleLatentValidator, OracleSegmenter


def test_lazy_rows_load_only_the_rows_indexed():
    data = torch.arange(40.0).reshape(10, 2, 2)
    asked = []

    def load(rows):
        asked.append(list(rows))
        return data[torch.from_numpy(rows)]

    view = LazyRows(load, n=10)
    assert len(view) == 10 and view.shape == (10, 2, 2) and view.dtype == torch.float32
    asked.clear()
    assert torch.equal(view[3], data[3]) and torch.equal(view[2:5], data[2:5])
    assert torch.equal(view[[7, 1]], data[[7, 1]]) and torch.equal(view[torch.tensor([0, 9])], data[[0, 9]])
    assert asked == [[3], [2, 3, 4], [7, 1], [0, 9]]
    sub = view.take([8, 6, 4])  # a view of a view: positions compose, nothing read yet
    assert len(asked) == 4 and torch.equal(sub[1:], data[[6, 4]]) and torch.equal(sub[-1], data[4])
    empty = view.take([])
    assert len(empty) == 0 and empty[0:3].shape == (0, 2, 2)
    with pytest.raises(ValueError, match="either n or positions"):
        LazyRows(load)


def _many(gen, copies: int):
    """The fixture's generate folder with every row repeated ``copies`` times (fresh ids, same files)."""
    rows = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    many = [{**r, "id": f"{r['id']}c{c}"} for c in range(copies) for r in rows]
    (gen / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    return rows, many


@pytest.mark.parametrize("mode", ["pixel", "single_step"])
def test_validate_holds_a_batch_of_samples_not_the_set(generated, tmp_path, monkeypatch, mode):
    """80 samples: no read of generated files takes more rows than a batch; the decisions and predictions
    are those the 10 distinct samples get on their own (for the latent gate, whose noise follows a sample's
    position, the first 10 rows)."""
    dm, gen, _ = generated
    overrides = [f"validator.mode={mode}", "validator.iou_threshold=0.5", "validator.t_eval=50"]
    cfg = load_config(None, overrides)

    def judge(folder, work):
        fd = FakeDiffusion()
        models = {"segmenter": OracleSegmenter()} if mode == "pixel" else \
            {"diffusion": fd, "validator": OracleLatentValidator(fd)}
        run_validate(cfg, dm, work, {"generate": folder}, feature_fn=pixel_stat_features, **models)
        return {d["id"]: d for d in map(json.loads, (work / "decisions.jsonl").read_text().splitlines())}

    alone = judge(gen, tmp_path / "alone")
    big = tmp_path / "big"
    shutil.copytree(gen, big)
    rows, many = _many(big, 8)
    loaded, resized = [], synthetic._resized
    monkeypatch.setattr(synthetic, "_resized", lambda arrays, *a: loaded.append(len(arrays)) or resized(arrays, *a))
    decisions = judge(big, tmp_path / "v")
    assert len(decisions) == len(many) == 80 and max(loaded) <= LATENT_BATCH < len(many)
    for row in many if mode == "pixel" else many[:len(rows)]:
        d, ref = decisions[row["id"]], alone[row["id"].rsplit("c", 1)[0]]
        assert (d["accepted"], d["reasons"]) == (ref["accepted"], ref["reasons"])
        assert d["iou"] == pytest.approx(ref["iou"], abs=1e-4)
        assert np.array_equal(read_mask(tmp_path / "v" / d["pred_mask"]), read_mask(tmp_path / "alone" / ref["pred_mask"]))
