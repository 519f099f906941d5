"""Shared fixtures: tiny copies of each published dataset layout (writers in tests/fakes.py), fakes installed."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The fixtures import tests/fakes.py when used: it loads torch and Lightning, which most test files never need.


@pytest.fixture(autouse=True)
def _run_records_in_tmp(tmp_path, monkeypatch):
    """Grids export finished cells to sweeps/records/ of the checkout; tests export to their tmp_path."""
    monkeypatch.setenv("MEDDIFFAUG_RECORDS_DIR", str(tmp_path / "records"))


@pytest.fixture
def make_dataset(tmp_path):
    """Factory ``make_dataset(name, **kw) -> root`` writing a tiny layout copy in tmp_path."""
    from fakes import MAKERS

    counter = iter(range(1000))

    def make(name: str, **kw) -> Path:
        return MAKERS[name](tmp_path / f"{name}_{next(counter)}", **kw)

    return make


@pytest.fixture
def dm_kwargs(tmp_path):
    """Datamodule keyword arguments for tiny, fast runs with a private cache folder."""
    return dict(image_size=16, n_real=None, split_seed=0, val_fraction=0.2, test_fraction=0.2,
                batch_size=4, num_workers=0, cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Fake pipeline stages installed (tests/fakes.py); invocation counters in ``tmp_path/calls``."""
    import fakes as fake_stages

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FAKE_STAGE_CALLS", str(tmp_path / "calls"))
    fake_stages.install(monkeypatch)
    return tmp_path / "calls"


@pytest.fixture
def generated(tmp_path):
    """A generate-stage folder: 4 good, 2 lesion-erased, 2 lesion-shifted, 1 noise, 1 copy of its source."""
    import torch
    from PIL import Image

    from fakes import S, RenderedDataModule, render, to_u8

    good, masks = render(8, seed=50)
    erased, _ = render(8, seed=50, lesion=False)
    shifted, _ = render(8, seed=50, shift=S // 3)
    dm = RenderedDataModule()
    noise = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(2))
    copy = torch.from_numpy(dm.images[2:3]).permute(0, 3, 1, 2).float() / 255
    images = torch.cat([good[:4], erased[4:6], shifted[6:8], noise, copy])
    all_masks = torch.cat([masks, masks[:1], torch.from_numpy(dm.masks[2:3]).long()])
    kinds = ["good"] * 4 + ["erased"] * 2 + ["shifted"] * 2 + ["noise", "copy"]
    gen = tmp_path / "generate"
    (gen / "images").mkdir(parents=True), (gen / "masks").mkdir()
    rows = []
    for i, (img, m, kind) in enumerate(zip(to_u8(images), all_masks.numpy().astype(np.uint8), kinds)):
        Image.fromarray(img).save(gen / "images" / f"g{i}.png")
        Image.fromarray(m).save(gen / "masks" / f"g{i}.png")
        rows.append({"id": f"g{i}", "image": f"images/g{i}.png", "mask": f"masks/g{i}.png",
                     "source_id": "r2" if kind == "copy" else f"r{i}", "kind": kind, "seed": i})
    (gen / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dm, gen, kinds
