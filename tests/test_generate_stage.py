"""run_generate end to end (copy-paste, and diffusion with a fake model) + SyntheticPairs."""
import json

import numpy as np
import pytest
import torch

from datamodules.errors import DataError
from datamodules.synthetic import SyntheticPairs, mix_real_and_synthetic
from experiments.stages import generate as generate_stage
from experiments.config import load_config
from datamodules.io import read_image, read_manifest, read_mask, write_manifest
from fakes import ArrayDataModule

S = 32


class FakeModel:
    """Fills the mask with pure green; counts the samples it was asked for."""

    def __init__(self):
        self.calls = []

    def inpaint(self, source, mask, prompts, negative_prompts, guidance_scale, steps, scheduler,
                guiding_mask, guide_dilate_px, generator, step_callback=None, return_info=False):
        assert source.shape[0] == mask.shape[0] == len(prompts) == len(negative_prompts)
        assert prompts[0] == "a polyp" and negative_prompts[0] == "normal mucosa"
        assert isinstance(generator, torch.Generator)
        self.calls.append(source.shape[0])
        colour = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
        out = source * (1 - mask) + colour * mask
        return (out, {}) if return_info else out


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
    dm = ArrayDataModule()
    metrics = generate_stage.run_generate(_cfg("copy_paste"), dm, tmp_path, {})
    for key in ("gen/n_samples", "gen/seconds", "gen/samples_per_s", "gen/fid", "gen/kid"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["gen/n_samples"] == 6 and dm.setup_calls == 1
    records = read_manifest(tmp_path / "manifest.jsonl")
    assert [r["id"] for r in records] == [f"syn_{i:05d}" for i in range(6)]
    assert (tmp_path / "grid.png").stat().st_size > 1000
    for r in records:
        for key in ("id", "image", "mask", "new_mask", "source_id", "source_index", "seed", "sample_seed",
                    "mask_params", "method", "donor_index", "paste_angle"):
            assert key in r, key
        assert r["source_index"] in dm.split_indices["train_few"] and r["donor_index"] < 6
        for key in ("shape", "scale", "angle", "dx", "dy", "jitter_seed"):
            assert key in r["mask_params"]
        img = read_image(tmp_path / r["image"])
        label, new = read_mask(tmp_path / r["mask"]), read_mask(tmp_path / r["new_mask"])
        existing = dm.masks[r["source_index"]] > 0
        assert (label[existing] == 1).all(), "existing lesion labelled background"
        assert (label[new > 0] == 1).all() and not (new.astype(bool) & existing).any()
        assert not new[~dm.fov].any()
        src = dm.images[r["source_index"]]
        assert (img[label == 0] != src[label == 0]).any(axis=-1).mean() < 0.2  # mostly the source
        assert img[new > 0, 0].mean() > img[new > 0, 1].mean() + 60  # red, like the donor lesions


def test_diffusion_matches_copy_paste_masks_and_sources(tmp_path, fake_model):
    dm = ArrayDataModule()
    generate_stage.run_generate(_cfg("copy_paste"), dm, tmp_path / "cp", {})
    metrics = generate_stage.run_generate(_cfg("diffusion"), dm, tmp_path / "df", {"finetune": tmp_path})
    assert metrics["gen/n_samples"] == 6 and fake_model.calls == [4, 2]
    cp = read_manifest(tmp_path / "cp" / "manifest.jsonl")
    df = read_manifest(tmp_path / "df" / "manifest.jsonl")
    for a, b in zip(cp, df):
        assert (a["source_id"], a["mask_params"], a["sample_seed"]) == (b["source_id"], b["mask_params"], b["sample_seed"])
        np.testing.assert_array_equal(read_mask(tmp_path / "cp" / a["mask"]),
                                      read_mask(tmp_path / "df" / b["mask"]))
        for key in ("guidance_scale", "steps", "scheduler", "guiding_mask", "guide_dilate_px", "prompt",
                    "negative_prompt", "batch_seed", "method"):
            assert key in b, key
        img = read_image(tmp_path / "df" / b["image"])
        new = read_mask(tmp_path / "df" / b["new_mask"]) > 0
        assert (img[new] == (0, 255, 0)).all()
        np.testing.assert_array_equal(img[~new], dm.images[b["source_index"]][~new])


def test_same_seed_reproduces_and_resume_skips_finished(tmp_path, fake_model):
    dm = ArrayDataModule()
    cfg = _cfg("diffusion", n=7)
    generate_stage.run_generate(cfg, dm, tmp_path / "full", {"finetune": tmp_path})
    full = read_manifest(tmp_path / "full" / "manifest.jsonl")
    # Interrupted run: only the first batch reached the manifest.
    part = tmp_path / "part"
    generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    write_manifest(part / "manifest.jsonl", read_manifest(part / "manifest.jsonl")[:4])
    kept_mtime = (part / "images" / "syn_00000.png").stat().st_mtime_ns
    fake_model.calls.clear()
    metrics = generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    assert fake_model.calls == [3] and metrics["gen/n_samples"] == 7
    assert (part / "images" / "syn_00000.png").stat().st_mtime_ns == kept_mtime
    assert read_manifest(part / "manifest.jsonl") == full
    fake_model.calls.clear()
    generate_stage.run_generate(cfg, dm, part, {"finetune": tmp_path})
    assert fake_model.calls == []  # finished: nothing regenerated, model not even asked


def test_diffusion_without_finetune_upstream_is_explained(tmp_path):
    with pytest.raises(ValueError, match="finetune"):
        generate_stage.run_generate(_cfg("diffusion"), ArrayDataModule(), tmp_path, {})
    with pytest.raises(ValueError, match="augment.method"):
        generate_stage.run_generate(_cfg("standard"), ArrayDataModule(), tmp_path, {})


def test_synthetic_pairs_and_mixing(tmp_path):
    dm = ArrayDataModule()
    generate_stage.run_generate(_cfg("copy_paste", n=5), dm, tmp_path, {})
    ds = SyntheticPairs(tmp_path / "manifest.jsonl", image_size=S)
    item = ds[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, S, S)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["mask"].dtype == torch.int64 and item["mask"].shape == (S, S) and item["id"] == "syn_00000"
    assert SyntheticPairs(tmp_path / "manifest.jsonl", image_size=16)[0]["mask"].shape == (16, 16)
    # Absolute paths (validate's accepted.jsonl) work too.
    recs = read_manifest(tmp_path / "manifest.jsonl")
    absolute = [{**r, "image": str(tmp_path / r["image"]), "mask": str(tmp_path / r["mask"])} for r in recs]
    write_manifest(tmp_path / "other" / "accepted.jsonl", absolute)
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


def _lesion_map(x: torch.Tensor) -> torch.Tensor:
    """The fake "VAE": a 1-channel latent at pixel resolution marking lesion-red pixels. (B,3,H,W) -> (B,1,H,W)."""
    return ((x[:, 0] > 190 / 255) & (x[:, 1] < 70 / 255)).float()[:, None]


class FakeLatentDiffusion:
    """Diffusion API with a sampler loop: paints a lesion into the mask at even batch positions and
    leaves odd ones empty (a "ghost"); ε̂ = 0, so ẑ0 at any step is the sample's final latent."""

    num_train_timesteps, timesteps, device = 1000, (900, 500, 150, 50), torch.device("cpu")
    alphas_cumprod = torch.cat([torch.ones(300), torch.linspace(0.99, 0.01, 700)])  # noise-free below t=300

    def __init__(self):
        self.unet_calls = []  # per sample id position in call order: number of ε̂ calls

    def encode_images(self, x):
        return _lesion_map(x)

    def encode_prompts(self, prompts):
        return torch.zeros(len(prompts), 2, 4)

    def predict_eps(self, z_t, t, mask_lat, masked_image_lat, text_emb):
        return torch.zeros_like(z_t)

    def inpaint(self, source, mask, prompts, negative_prompts, guidance_scale, steps, scheduler,
                guiding_mask, guide_dilate_px, generator, step_callback=None, **kwargs):
        b, m = source.shape[0], mask.float()
        good = (torch.arange(b) % 2 == 0).float().view(b, 1, 1, 1)
        red = torch.tensor([210, 60, 60]).view(1, 3, 1, 1) / 255
        final = source * (1 - m * good) + red * m * good
        z0, calls, active = _lesion_map(final), torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.bool)
        for i, t in enumerate(self.timesteps):
            calls[active] += 1
            a = self.alphas_cumprod[t]
            stop = step_callback(i, t, a.sqrt() * z0, torch.zeros_like(z0)) if step_callback else None
            if stop is not None:
                active &= ~stop.bool()
        self.unet_calls += calls.tolist()
        out = torch.where(active.view(b, 1, 1, 1), final, source)
        info = {"stopped": ~active, "latents": z0 * active.view(b, 1, 1, 1),
                "mask_latents": m, "masked_latents": _lesion_map(source * (1 - m))}
        return (out, info) if kwargs.get("return_info") else out


class FakeLatentValidator:
    """Segments a latent by thresholding it (the fake VAE's latent is the lesion map)."""

    def predict_masks(self, x, t, out_size, prompt=None):
        return torch.nn.functional.interpolate((x[:, :1] > 0.5).float(), size=tuple(out_size))[:, 0].long()


def test_early_rejection_stops_records_and_counts(tmp_path, monkeypatch):
    from experiments.stages.validate import run_validate

    dm, model = ArrayDataModule(), FakeLatentDiffusion()
    dm.num_classes = 2
    monkeypatch.setattr(generate_stage, "load_model", lambda cfg, upstream: model)
    monkeypatch.setattr(generate_stage, "load_validator", lambda *a, **k: FakeLatentValidator())
    cfg = load_config(None, ["augment.method=diffusion", "generation.n_samples=6", "generation.batch_size=4",
                             "validator.mode=single_step", "validator.early_reject_t=200", "validator.t_eval=100",
                             "validator.iou_threshold=0.9", "validator.quality_filter=false", "validator.erode_px=0"])
    gen = tmp_path / "gen"
    metrics = generate_stage.run_generate(cfg, dm, gen, {"finetune": tmp_path})
    rows = read_manifest(gen / "manifest.jsonl")
    early = [r for r in rows if r["early_rejected"]]
    assert [r["batch_position"] % 2 for r in early] == [1] * 3 and len(rows) == 6
    # stopped at the first step with t <= 200 (the 3rd of 4): never finished, no image
    assert model.unet_calls == [4 if k % 2 == 0 else 3 for k in (0, 1, 2, 3, 0, 1)]
    for r in rows:
        assert r["early_reject_t"] == 150 and (r["early_reject_iou"] < 0.9) == r["early_rejected"]
        assert (r["image"] is None) == r["early_rejected"] and ("latents" in r) != r["early_rejected"]
    assert not (gen / "images" / f"{early[0]['id']}.png").exists()
    assert metrics["gen/n_early_rejected"] == 3 and metrics["gen/n_samples"] == 6
    assert len(SyntheticPairs(gen / "manifest.jsonl", image_size=S)) == 3  # readers skip unfinished rows

    work = tmp_path / "val"
    val = run_validate(cfg, dm, work, {"generate": gen}, diffusion=model, validator=FakeLatentValidator())
    decisions = {d["id"]: d for d in map(json.loads, (work / "decisions.jsonl").read_text().splitlines())}
    assert len(decisions) == 6 and all(not decisions[r["id"]]["accepted"] for r in early)
    assert decisions[early[0]["id"]]["reasons"] == ["early_reject@t150"]
    assert val["gen/n_accepted"] == 3 and val["gen/accept_rate"] == 0.5 and val["gen/early_reject_rate"] == 0.5
    assert "latents from generate" in decisions[rows[0]["id"]]["gate"]
