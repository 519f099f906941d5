"""Datamodules: layouts, splits, few-shot subsets, cache and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import datamodules
import datamodules.pairs as pairs
from datamodules import create_datamodule
from datamodules.errors import DataError

from fakes import CVC_FRAMES, H, W, _mask, _save, refuge_mask

# name, maker kwargs, number of pairs, classes
CASES = [
    ("kvasir_seg", {}, 10, ("background", "polyp")),
    ("cvc_clinicdb", {}, len(CVC_FRAMES), ("background", "polyp")),
    ("cvc_clinicdb", {"png": True}, len(CVC_FRAMES), ("background", "polyp")),
    ("refuge2", {}, 8, ("background", "optic_disc", "optic_cup")),
    ("isic2018", {}, 8, ("background", "lesion")),
    ("busi", {}, 12, ("background", "lesion")),
    ("folder", {}, 8, ("background", "lesion")),
]


def _dm(name, root, **kw):
    dm = create_datamodule(name, root=str(root), **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("name,make_kw,n,classes", CASES)
def test_layout_counts_classes_and_splits(make_dataset, dm_kwargs, name, make_kw, n, classes):
    root = make_dataset(name, **make_kw)
    dm = _dm(name, root, **dm_kwargs)
    assert dm.images.shape == (n, 16, 16, 3) and dm.images.dtype == np.uint8
    assert dm.masks.shape == (n, 16, 16) and dm.masks.dtype == np.uint8
    assert dm.classes == classes and dm.num_classes == len(classes)
    assert dm.masks.max() < dm.num_classes and dm.masks.max() > 0
    sets = {k: set(v) for k, v in dm.split_indices.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert len(sets["train"]) + len(sets["val"]) + len(sets["test"]) == n
    assert all(sets[k] for k in ("train", "val", "test"))
    assert sets["train_few"] == sets["train"]  # n_real=None
    again = _dm(name, root, **{**dm_kwargs, "cache_dir": None})  # same split, decoded afresh
    assert again.split_ids == dm.split_ids
    assert np.array_equal(again.images, dm.images) and np.array_equal(again.masks, dm.masks)


def test_samples_and_loaders(make_dataset, dm_kwargs):
    dm = _dm("kvasir_seg", make_dataset("kvasir_seg"), **dm_kwargs)
    item = dm.dataset("train", train_transforms=True)[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (16, 16) and item["mask"].dtype == torch.int64
    assert isinstance(item["id"], str)
    dm.extra_train = dm.dataset("val")
    n_batches = sum(1 for _ in dm.train_dataloader())
    assert n_batches == -(-(len(dm.split_indices["train_few"]) + len(dm.split_indices["val"])) // 4)
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 16, 16) and batch["mask"].dtype == torch.int64


def test_ids_sort_numerically_not_by_filesystem(make_dataset, dm_kwargs):
    dm = _dm("cvc_clinicdb", make_dataset("cvc_clinicdb"), **dm_kwargs)
    assert dm.ids == [str(f) for f in sorted(CVC_FRAMES)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cvc_sequences_never_straddle_splits(make_dataset, dm_kwargs, seed):
    from datamodules.cvc_clinicdb import sequence_of

    dm = _dm("cvc_clinicdb", make_dataset("cvc_clinicdb"), **{**dm_kwargs, "split_seed": seed})
    owner = {}
    for split in ("train", "val", "test"):
        for i in dm.split_ids[split]:
            assert owner.setdefault(sequence_of(i), split) == split


def test_cvc_sequence_boundaries():
    from datamodules.cvc_clinicdb import sequence_of

    assert sequence_of("1") == sequence_of("25") == "seq01"
    assert sequence_of("26") == "seq02" and sequence_of("200") == sequence_of("205") == "seq10"
    assert sequence_of("591") == sequence_of("612") == "seq29"
    assert sequence_of("613") == "frame-613"


def test_kvasir_official_split_honoured(make_dataset, dm_kwargs):
    root = make_dataset("kvasir_seg", official=True)
    dm = _dm("kvasir_seg", root, **dm_kwargs)
    official_train = (root / "train.txt").read_text().split()
    assert dm.split_ids["test"] == (root / "val.txt").read_text().split()
    assert set(dm.split_ids["train"]) | set(dm.split_ids["val"]) == set(official_train)
    assert dm.split_ids["val"]  # carved from the official train


def test_refuge_official_sets_used_when_present(make_dataset, dm_kwargs):
    dm = _dm("refuge2", make_dataset("refuge2", with_val=True, with_test=True), **dm_kwargs)
    assert dm.split_ids["val"] == ["V0001", "V0002", "V0003"]
    assert dm.split_ids["test"] == ["T0001", "T0002", "T0003"]
    assert len(dm.split_ids["train"]) == 8


def test_few_shot_from_train_only_seeded_and_nested(make_dataset, dm_kwargs):
    root = make_dataset("busi", n=6)
    kw = {**dm_kwargs, "n_real": 5}
    a, b = _dm("busi", root, **kw), _dm("busi", root, **kw)
    few = set(a.split_ids["train_few"])
    assert len(few) == 5 and few <= set(a.split_ids["train"])
    assert a.split_ids == b.split_ids
    smaller = _dm("busi", root, **{**kw, "n_real": 3})
    assert set(smaller.split_ids["train_few"]) <= few  # nested subsets
    assert smaller.split_ids["test"] == a.split_ids["test"]  # test untouched by few-shot
    others = [_dm("busi", root, **{**kw, "n_real": 3, "split_seed": s}).split_ids["train_few"]
              for s in range(1, 5)]
    assert any(o != smaller.split_ids["train_few"] for o in others)
    with pytest.raises(DataError, match="n_real=999"):
        _dm("busi", root, **{**kw, "n_real": 999})


def test_cache_hit_skips_decoding(make_dataset, dm_kwargs, monkeypatch):
    root = make_dataset("isic2018")
    first = _dm("isic2018", root, **dm_kwargs)
    assert first.cache_path.exists()
    assert not [p for p in first.cache_path.parent.iterdir() if p.suffix == ".tmp"]

    def boom(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(pairs, "read_image", boom)
    second = _dm("isic2018", root, **dm_kwargs)
    assert np.array_equal(second.images, first.images) and second.ids == first.ids
    with pytest.raises(AssertionError):  # another size is another cache entry
        _dm("isic2018", root, **{**dm_kwargs, "image_size": 8})


def test_refuge_lookup_remap():
    from datamodules.refuge2 import Refuge2

    raw = refuge_mask(0)
    out = Refuge2().remap(raw, Path("x.bmp"))
    assert (out[raw == 255] == 0).all() and (out[raw == 128] == 1).all()
    assert (out[raw == 0] == 2).all()


def test_refuge_bmp_exact_values(make_dataset):
    from datamodules.refuge2 import Refuge2

    lay = Refuge2()
    rec = lay.discover(make_dataset("refuge2", n=1))[0]
    assert set(np.unique(lay.read_mask(rec)).tolist()) == {0, 1, 2}


def test_busi_union_and_normal_empty(make_dataset):
    from datamodules.pairs import load_pair
    from datamodules.busi import Busi

    lay = Busi()
    recs = {r.id: r for r in lay.discover(make_dataset("busi", n=2))}
    assert len(recs["benign (1)"].mask_paths) == 2
    _, m = load_pair(lay, recs["benign (1)"])
    expected = (_mask(1) > 0) | (np.pad(np.ones((4, 4)), ((18, H - 22), (14, W - 18))) > 0)
    assert np.array_equal(m, expected.astype(np.uint8))
    _, normal = load_pair(lay, recs["normal (2)"])
    assert normal.shape == (H, W) and not normal.any()
    assert {r.stratum for r in recs.values()} == {"benign", "malignant", "normal"}


def test_folder_binary_and_inferred_classes(make_dataset, dm_kwargs):
    dm = _dm("folder", make_dataset("folder", multiclass=True), **dm_kwargs)
    assert dm.classes == ("background", "class_1", "class_2")
    dm = _dm("folder", make_dataset("folder", multiclass=True), classes=["bg", "a", "b"],
             **dm_kwargs)
    assert dm.classes == ("bg", "a", "b")
    with pytest.raises(DataError, match="class index 2"):
        _dm("folder", make_dataset("folder", multiclass=True), classes=["bg", "a"], **dm_kwargs)


def test_write_split_roundtrip(make_dataset, dm_kwargs, tmp_path):
    root = make_dataset("cvc_clinicdb")
    dm = _dm("cvc_clinicdb", root, **{**dm_kwargs, "n_real": 3})
    path = dm.write_split(tmp_path / "splits" / "split.json")
    data = json.loads(path.read_text())
    assert set(data) == {"train", "train_few", "val", "test"} and len(data["train_few"]) == 3
    other = _dm("cvc_clinicdb", root, **{**dm_kwargs, "split_seed": 7, "split_file": str(path)})
    assert other.split_ids == dm.split_ids
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]


def test_procedural_datamodule(dm_kwargs):
    dm = create_datamodule("procedural_fundus", n_procedural=10, procedural_seed=0, **dm_kwargs)
    dm.setup()
    assert dm.images.shape == (10, 16, 16, 3) and dm.num_classes == 3 and dm.modality
    assert sum(len(dm.split_ids[k]) for k in ("train", "val", "test")) == 10


def test_unknown_dataset_lists_valid_and_closest():
    with pytest.raises(DataError, match="kvasir_seg") as e:
        create_datamodule("kvasir", root=".")
    assert "Did you mean 'kvasir_seg'" in str(e.value) and "busi" in str(e.value)


# ---------------------------------------------------------------- bad input -> DataError
def _rm(rel):
    return lambda root: (root / rel).unlink()


def _truncate(rel):
    def f(root):
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 3])
    return f


def _write_mask(rel, arr):
    return lambda root: _save(arr, root / rel)


def _split_file_with_unknown(root):
    (root / "split.json").write_text(json.dumps(
        {"train": ["1", "999"], "val": ["2"], "test": ["3"]}))


BAD = [  # name, maker kwargs, breaker, text the message must contain
    ("kvasir_seg", {}, _rm("masks/cju3abc.jpg"), "cju3abc.jpg"),
    ("kvasir_seg", {}, _rm("images/cju4abc.jpg"), "masks/cju4abc.jpg"),
    ("kvasir_seg", {}, _truncate("images/cju2abc.jpg"), "cju2abc.jpg"),
    ("kvasir_seg", {}, lambda r: (r / "masks").rename(r / "labels"), "'masks'"),
    ("cvc_clinicdb", {}, _write_mask("Ground Truth/26.tif", np.zeros((10, 10), np.uint8)),
     "Ground Truth/26.tif"),
    ("cvc_clinicdb", {}, _truncate("Original/27.tif"), "27.tif"),
    ("cvc_clinicdb", {}, _write_mask("Ground Truth/2.tif", _mask(2, fg=200)), "[0, 200]"),
    ("refuge2", {}, _write_mask("Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0002.bmp",
                                np.full((H, W), 64, np.uint8)), "g0002.bmp"),
    ("isic2018", {}, _rm("ISIC2018_Task1_Training_GroundTruth/ISIC_0000003_segmentation.png"),
     "ISIC_0000003.jpg"),
    ("isic2018", {}, _write_mask("ISIC2018_Task1_Training_GroundTruth/"
                                 "ISIC_0000001_segmentation.png", _mask(1, fg=7)), "[0, 7]"),
    ("busi", {}, _rm("Dataset_BUSI_with_GT/malignant/malignant (2)_mask.png"), "malignant (2).png"),
    ("busi", {}, _rm("Dataset_BUSI_with_GT/benign/benign (3).png"), "benign (3)_mask.png"),
    ("folder", {}, _rm("masks/case1.png"), "case1.png"),
]


@pytest.mark.parametrize("name,make_kw,breaker,expected", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_raises_clear_error(make_dataset, dm_kwargs, name, make_kw, breaker, expected):
    root = make_dataset(name, **make_kw)
    breaker(root)
    with pytest.raises(DataError) as e:
        _dm(name, root, **dm_kwargs)
    assert expected in str(e.value)
    cache = Path(dm_kwargs["cache_dir"])  # nothing half-written
    assert not cache.exists() or not any(cache.iterdir())


def test_empty_or_wrong_root_names_expected_layout(tmp_path, dm_kwargs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Training400"):
        _dm("refuge2", tmp_path / "empty", **dm_kwargs)
    with pytest.raises(DataError, match="does not exist"):
        _dm("busi", tmp_path / "missing", **dm_kwargs)
    with pytest.raises(DataError, match="data.root"):
        create_datamodule("isic2018", **dm_kwargs).setup()


def test_split_file_with_unknown_ids(make_dataset, dm_kwargs):
    root = make_dataset("cvc_clinicdb")
    _split_file_with_unknown(root)
    with pytest.raises(DataError, match="999"):
        _dm("cvc_clinicdb", root, split_file=str(root / "split.json"), **dm_kwargs)


def test_registry_has_every_layout_and_procedural():
    assert {"kvasir_seg", "cvc_clinicdb", "refuge2", "isic2018", "busi", "folder",
            "procedural_polyp", "procedural_fundus", "procedural_skin",
            "procedural_ultrasound"} <= set(datamodules.DATASETS)
