"""Shared fixtures: tiny copies of each published dataset layout written into ``tmp_path``.

Images are 20x24 (W x H) so resizing to 16 px is exercised; masks hold one rectangle.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

W, H = 20, 24


@pytest.fixture(autouse=True)
def _run_records_in_tmp(tmp_path, monkeypatch):
    """Grids export finished cells to sweeps/records/ of the checkout; tests export to their tmp_path."""
    monkeypatch.setenv("MEDDIFFAUG_RECORDS_DIR", str(tmp_path / "records"))


def _image(seed: int, w: int = W, h: int = H) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(seed: int, fg: int = 255, bg: int = 0, w: int = W, h: int = H) -> np.ndarray:
    """uint8 (h,w) with a seeded rectangle of value ``fg`` on ``bg``."""
    rng = np.random.default_rng(seed + 1000)
    m = np.full((h, w), bg, np.uint8)
    y, x = rng.integers(2, h // 2), rng.integers(2, w // 2)
    m[y:y + 6, x:x + 6] = fg
    return m


def _save(arr_or_img, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path)
    return path


def make_kvasir(root: Path, n: int = 10, official: bool = False) -> Path:
    ids = [f"cju{i}abc" for i in range(n)]
    for i, k in enumerate(ids):
        _save(_image(i), root / "images" / f"{k}.jpg")
        _save(Image.fromarray(_mask(i)).convert("RGB"), root / "masks" / f"{k}.jpg")  # lossy
    if official:
        (root / "train.txt").write_text("\n".join(ids[:7]) + "\n")
        (root / "val.txt").write_text("\n".join(ids[7:]) + "\n")
    return root


# Frames from 6 video sequences (1-25, 26-50, 51-67, 68-78, 79-103, 104-126).
CVC_FRAMES = (1, 2, 3, 26, 27, 28, 51, 52, 68, 69, 79, 80, 104, 105)


def make_cvc(root: Path, png: bool = False, frames=CVC_FRAMES) -> Path:
    base, ext = (root / "PNG", "png") if png else (root, "tif")
    for f in frames:
        _save(_image(f), base / "Original" / f"{f}.{ext}")
        _save(_mask(f), base / "Ground Truth" / f"{f}.{ext}")
    return root


def refuge_mask(seed: int) -> np.ndarray:
    """Raw REFUGE mask: 255 background, 128 disc rim, 0 cup inside the disc."""
    m = np.full((H, W), 255, np.uint8)
    m[4:16, 4:14] = 128
    m[7:12, 7:11] = 0
    return m


def make_refuge(root: Path, n: int = 4, with_val: bool = False, with_test: bool = False) -> Path:
    for cls, p in (("Glaucoma", "g"), ("Non-Glaucoma", "n")):
        for i in range(1, n + 1):
            _save(_image(i), root / "Training400" / cls / f"{p}{i:04d}.jpg")
            _save(refuge_mask(i), root / "Annotation-Training400" / "Disc_Cup_Masks" / cls /
                  f"{p}{i:04d}.bmp")
    for flag, img_dir, mask_dir, p in ((with_val, "REFUGE-Validation400",
                                        "REFUGE-Validation400-GT", "V"),
                                       (with_test, "REFUGE-Test400", "REFUGE-Test-GT", "T")):
        if flag:
            for i in range(1, 4):
                _save(_image(50 + i), root / img_dir / f"{p}{i:04d}.jpg")
                _save(refuge_mask(i), root / mask_dir / "Disc_Cup_Masks" / f"{p}{i:04d}.bmp")
    return root


def make_isic(root: Path, n: int = 8) -> Path:
    img_dir = root / "ISIC2018_Task1-2_Training_Input"
    gt_dir = root / "ISIC2018_Task1_Training_GroundTruth"
    for i in range(n):
        _save(_image(i), img_dir / f"ISIC_{i:07d}.jpg")
        _save(_mask(i), gt_dir / f"ISIC_{i:07d}_segmentation.png")
    for d in (img_dir, gt_dir):  # the published folders carry these; they must be ignored
        (d / "LICENSE.txt").write_text("CC-BY-NC")
        (d / "ATTRIBUTION.txt").write_text("ISIC")
    return root


def make_busi(root: Path, n: int = 4) -> Path:
    base = root / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        for i in range(1, n + 1):
            _save(_image(i), base / cls / f"{cls} ({i}).png")
            if cls == "normal":
                _save(np.zeros((H, W), np.uint8), base / cls / f"{cls} ({i})_mask.png")
            else:
                _save(_mask(i), base / cls / f"{cls} ({i})_mask.png")
    # benign (1) has a second lesion in _mask_1.png: the masks are united
    second = np.zeros((H, W), np.uint8)
    second[18:22, 14:18] = 255
    _save(second, base / "benign" / "benign (1)_mask_1.png")
    return root


def make_folder(root: Path, n: int = 8, multiclass: bool = False) -> Path:
    for i in range(n):
        _save(_image(i), root / "images" / f"case{i}.png")
        m = _mask(i, fg=1)
        if multiclass:
            m[0:3, 0:3] = 2
        _save(m, root / "masks" / f"case{i}.png")
    return root


MAKERS = {"kvasir_seg": make_kvasir, "cvc_clinicdb": make_cvc, "refuge2": make_refuge,
          "isic2018": make_isic, "busi": make_busi, "folder": make_folder}


@pytest.fixture
def make_dataset(tmp_path):
    """Factory ``make_dataset(name, **kw) -> root`` writing a tiny layout copy in tmp_path."""
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
