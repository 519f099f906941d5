"""run_generate end to end (copy-paste, and diffusion with a fake model) + SyntheticPairs."""
import json

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from datamodules.synthetic import SyntheticPairs, mix_real_and_synthetic
from experiments import generate_stage
from experiments.config import load_config
from lightning_modules.components import pairs_io

S = 32


class FakeDataModule:
    """Datamodule-like arrays: rows 0-5 train_few (0-3 with a lesion), 6-7 val, 8-9 test."""

    prompt, background_prompt, modality = "a polyp", "normal mucosa", "polyp"
    classes = ("background", "polyp")

    def __init__(self):
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:S, :S]
        self.fov = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 15 ** 2
        self.images = np.zeros((10, S, S, 3), np.uint8)
        self.masks = np.zeros((10, S, S), np.uint8)
        for i in range(10):
            img = np.clip(rng.normal((150, 90, 80), 8, (S, S, 3)), 0, 255)
            img[~self.fov] = 0
            if i < 4 or i >= 6:
                cy, cx = rng.integers(9, 14, 2)
                lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
                img[lesion] = (210, 60, 60)
                self.masks[i][lesion] = 1
            self.images[i] = img.astype(np.uint8)
        self.ids = [f"real_{i}" for i in range(10)]
        self.split_indices = {"train": list(range(6)), "train_few": list(range(6)), "val": [6, 7], "test": [8, 9]}
        self.setup_calls = 0

    def setup(self, stage=None):
        self.setup_calls += 1


class FakeModel:
    """Fills the mask with pure green; counts the samples it was asked for."""

    def __init__(self):
        self.calls = []

    def inpaint(self, source, mask, prompts, negative_prompts, guidance_scale, steps, scheduler,
                guiding_mask, guide_dilate_px, generator, step_callback=None):
        assert source.shape[0] == mask.shape[0] == len(prompts) == len(negative_prompts)
        assert prompts[0] == "a polyp" and negative_prompts[0] == "normal mucosa"
        assert isinstance(generator, torch.Generator)
        self.calls.append(source.shape[0])
        colour = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        return source * (1 - mask) + colour * mask


def _cfg(method, n=6, **extra):
    over = [f"augment.method={method}", f"generation.n_samples={n}", "generation.batch_size=4",
            "generation.seed=3"] + [f"generation.{k}={v}" for k, v in extra.items()]
    return load_config(None, over)


@pytest.fixture
def fake_model(monkeypatch):
    model = FakeModel()
    monkeypatch.setattr(generate_stage, "load_model", lambda cfg, upstream: model)
    return model


def test_copy_paste_end_to_end(tmp_path):
    dm = FakeDataModule()
    metrics = generate_stage.run_generate(_cfg("copy_paste"), dm, tmp_path, {})
    for key in ("gen/n_samples", "gen/seconds", "gen/samples_per_s", "gen/fid", "gen/kid"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["gen/n_samples"] == 6 and dm.setup_calls == 1
    records = pairs_io.read_manifest(tmp_path / "manifest.jsonl")
    assert [r["id"] for r in records] == [f"syn_{i:05d}" for i in range(6)]
    assert (tmp_path / "grid.png").stat().st_size > 1000
    for r in records:
        for key in ("id", "image", "mask", "new_mask", "source_id", "source_index", "seed", "sample_seed",
                    "mask_params", "method", "donor_index", "paste_angle"):
            assert key in r, key
        assert r["source_index"] in dm.split_indices["train_few"] and r["donor_index"] < 6
        for key in ("shape", "scale", "angle", "dx", "dy", "jitter_seed"):
            assert key in r["mask_params"]
        img = pairs_io.read_image(tmp_path / r["image"])
        label, new = pairs_io.read_mask(tmp_path / r["mask"]), pairs_io.read_mask(tmp_path / r["new_mask"])
        existing = dm.masks[r["source_index"]] > 0
        assert (label[existing] == 1).all(), "existing lesion labelled background"
        assert (label[new > 0] == 1).all() and not (new.astype(bool) & existing).any()
        assert not new[~dm.fov].any()
        src = dm.images[r["source_index"]]
        assert (img[label == 0] != src[label == 0]).any(axis=-1).mean() < 0.2  # mostly the source
        assert img[new > 0, 0].mean() > img[new > 0, 1].mean() + 60  # red, like the donor lesions


def test_diffusion_matches_copy_paste_masks_and_sources(tmp_path, fake_model):
    dm = FakeDataModule()
    generate_stage.run_generate(_cfg("copy_paste"), dm, tmp_path / "cp", {})
    metrics = generate_stage.run_generate(_cfg("diffusion"), dm, tmp_path / "df", {"finetune": tmp_path})
    assert metrics["gen/n_samples"] == 6 and fake_model.calls == [4, 2]
    cp = pairs_io.read_manifest(tmp_path / "cp" / "manifest.jsonl")
    df = pairs_io.read_manifest(tmp_path / "df" / "manifest.jsonl")
    for a, b in zip(cp, df):
        assert (a["source_id"], a["mask_params"], a["sample_seed"]) == (b["source_id"], b["mask_params"], b["sample_seed"])
        np.testing.assert_array_equal(pairs_io.read_mask(tmp_path / "cp" / a["mask"]),
                                      pairs_io.read_mask(tmp_path / "df" / b["mask"]))
        for key in ("guidance_scale", "steps", "scheduler", "guiding_mask", "guide_dilate_px", "prompt",
                    "negative_prompt", "batch_seed", "method"):
            assert key in b, key
        img = pairs_io.read_image(tmp_path / "df" / b["image"])
        new = pairs_io.read_mask(tmp_path / "df" / b["new_mask"]) > 0
        assert (img[new] == (0, 255, 0)).all()
        np.testing.assert_array_equal(img[~new], dm.images[b["source_index"]][~new])


def test_same_seed_reproduces_and_resume_skips_finished(tmp_path, fake_model):
    dm = FakeDataModule()
    cfg = _cfg("diffusion", n=7)
    generate_stage.run_generate(cfg, dm, tmp_path / "full", {"finetune": tmp_path})
    full = pairs_io.read_manifest(tmp_path / "full" / "manifest.jsonl")
    # Interrupted run: only the first batch reached the manifest.
    part = tmp_path / "part"
    generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    pairs_io.write_manifest(part / "manifest.jsonl", pairs_io.read_manifest(part / "manifest.jsonl")[:4])
    kept_mtime = (part / "images" / "syn_00000.png").stat().st_mtime_ns
    fake_model.calls.clear()
    metrics = generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    assert fake_model.calls == [3] and metrics["gen/n_samples"] == 7
    assert (part / "images" / "syn_00000.png").stat().st_mtime_ns == kept_mtime
    assert pairs_io.read_manifest(part / "manifest.jsonl") == full
    fake_model.calls.clear()
    generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    assert fake_model.calls == []  # finished: nothing regenerated, model not even asked


def test_diffusion_without_finetune_upstream_is_explained(tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        generate_stage.run_generate(_cfg("diffusion"), FakeDataModule(), tmp_path, {})
    with pytest.raises(ValueError, match="augment.method"):
        generate_stage.run_generate(_cfg("standard"), FakeDataModule(), tmp_path, {})


def test_synthetic_pairs_and_mixing(tmp_path):
    dm = FakeDataModule()
    generate_stage.run_generate(_cfg("copy_paste", n=5), dm, tmp_path, {})
    ds = SyntheticPairs(tmp_path / "manifest.jsonl", image_size=S)
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (S, S) and item["id"] == "syn_00000"
    assert SyntheticPairs(tmp_path / "manifest.jsonl", image_size=16)[0]["mask"].shape == (16, 16)
    # Absolute paths (validate's accepted.jsonl) work too.
    recs = pairs_io.read_manifest(tmp_path / "manifest.jsonl")
    absolute = [{**r, "image": str(tmp_path / r["image"]), "mask": str(tmp_path / r["mask"])} for r in recs]
    pairs_io.write_manifest(tmp_path / "other" / "accepted.jsonl", absolute)
    assert len(SyntheticPairs(tmp_path / "other" / "accepted.jsonl", S)) == 5

    real = torch.utils.data.TensorDataset(torch.zeros(4))
    assert mix_real_and_synthetic(real, ds, 0.0, seed=0) is real
    assert len(mix_real_and_synthetic(real, ds, 3.0, seed=0)) == 4 + 12  # with replacement
    a, b = mix_real_and_synthetic(real, ds, 1.0, 1), mix_real_and_synthetic(real, ds, 1.0, 1)
    assert a.datasets[1].indices == b.datasets[1].indices

    (tmp_path / recs[2]["mask"]).unlink()
    with pytest.raises(DataError, match="syn_00002.png"):
        SyntheticPairs(tmp_path / "manifest.jsonl", S)
    with pytest.raises(DataError, match="nope.jsonl"):
        SyntheticPairs(tmp_path / "nope.jsonl", S)
    json.dumps(recs)  # manifest records are plain JSON
