"""The label budget (n_val out of n_real), independent seeds, the fixed test pool, the normal pool,
synthetic-only training, and the grid files of the fresh frozen block (issues #15, #16)."""
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from datamodules import create_datamodule
from datamodules.budget import split_budget
from datamodules.errors import DataError
from experiments.cache import signatures as hashing
from experiments.runner import pipeline
from experiments.config import ConfigError, load_config
from lightning_modules.synthesis.planner import Planner
from lightning_modules.synthesis.sources import source_pool

KW = dict(image_size=32, n_procedural=40, batch_size=4, num_workers=0, cache_dir=None)
CONFIG = "experiments/configs/procedural_polyp_diffaug.yaml"


def _dm(kind="polyp", **kw):
    dm = create_datamodule(f"procedural_{kind}", **{**KW, **kw})
    dm.setup()
    return dm


def _digests(dm, split):
    return {hashlib.sha1(dm.images[i].tobytes()).hexdigest() for i in dm.split_indices[split]}


def _labelled(dm):
    return set().union(*(_digests(dm, s) for s in ("train", "val")))


def test_seeds_draw_their_own_training_content_and_share_one_test_pool():
    a = _dm(procedural_seed=100, split_seed=100, n_real=8, n_val=2, test_pool=30)
    b = _dm(procedural_seed=101, split_seed=101, n_real=8, n_val=2, test_pool=30)
    assert a.split_ids["test"] == b.split_ids["test"] and len(a.split_ids["test"]) == 30
    assert _digests(a, "test") == _digests(b, "test")
    assert not _labelled(a) & _labelled(b)  # no training or validation image in common


@pytest.mark.parametrize("seed", [0, 100])  # 0 is also the test pool's own content seed
def test_test_pool_is_disjoint_from_training_content(seed):
    dm = _dm(procedural_seed=seed, n_real=8, n_val=2, test_pool=30)
    assert not _digests(dm, "test") & _labelled(dm)
    assert not set(dm.split_ids["test"]) & set(dm.split_ids["train"] + dm.split_ids["val"])


def test_n_val_comes_out_of_n_real():
    dm = _dm(procedural_seed=3, split_seed=3, n_real=8, n_val=2, test_pool=20)
    few, val = dm.split_ids["train_few"], dm.split_ids["val"]
    assert len(few) == 6 and len(val) == 2 and not set(few) & set(val)
    assert all(any(dm.masks[dm.split_indices[s]].reshape(len(dm.split_indices[s]), -1).any(1))
               for s in ("train_few", "val"))  # both sides hold a lesion
    assert not set(val) & set(dm.split_ids["train"])  # val left the pool it came from
    share = load_config(CONFIG, ["data.n_real=16", "data.n_val=0.25"])
    assert share.data.n_val == 4 and isinstance(share.data.n_val, int)
    assert pipeline.signatures(share) == pipeline.signatures(load_config(CONFIG, ["data.n_real=16", "data.n_val=4"]))


def test_split_budget_is_stratified_and_keeps_groups_whole():
    budget = [f"f{i}" for i in range(8)]
    lesion = {i: i not in ("f0", "f1") for i in budget}
    for seed in range(20):
        val, few = split_budget(budget, {}, lesion, 2, seed)
        assert len(val) == 2 and sorted(val + few) == sorted(budget)
        assert any(lesion[i] for i in val) and any(lesion[i] for i in few)
    groups = {i: ("g0" if i in ("f2", "f3") else None) for i in budget}
    for seed in range(20):
        val, _ = split_budget(budget, groups, lesion, 2, seed)
        assert ("f2" in val) == ("f3" in val)  # frames of one sequence never straddle val and train


def test_normal_pool_is_lesion_free_and_outside_the_labelled_pairs(tmp_path):
    dm = _dm(procedural_seed=5, n_real=8, n_val=2, test_pool=20, n_normal=10)
    normal = dm.split_indices["normal"]
    assert len(normal) == 10 and not dm.masks[normal].any()
    ids = set(dm.split_ids["normal"])
    assert not ids & set().union(*(dm.split_ids[s] for s in ("train", "train_few", "val", "test")))
    digests = {hashlib.sha1(dm.images[i].tobytes()).hexdigest() for i in normal}
    assert not digests & (_labelled(dm) | _digests(dm, "test"))
    assert json.loads(dm.write_split(tmp_path / "split.json").read_text())["normal"] == dm.split_ids["normal"]
    with pytest.raises(DataError, match="data.n_normal=0"):
        _dm("fundus", n_real=8, n_normal=4)


def test_normal_pool_of_a_real_dataset_comes_from_lesion_free_train_images(make_dataset, dm_kwargs):
    root = make_dataset("busi", n=6)  # 6 benign, 6 malignant, 6 normal (empty masks)
    kw = {**dm_kwargs, "n_real": 4, "n_val": 1, "n_normal": 2, "test_fraction": 0.2}
    dm = create_datamodule("busi", root=str(root), **kw)
    dm.setup()
    normal, budget = set(dm.split_ids["normal"]), set(dm.split_ids["train_few"] + dm.split_ids["val"])
    assert len(normal) == 2 and normal <= set(dm.split_ids["train"]) and not normal & budget
    assert not dm.masks[dm.split_indices["normal"]].any()
    with pytest.raises(DataError, match="data.n_normal"):
        create_datamodule("busi", root=str(root), **{**kw, "n_normal": 50}).setup()


def test_budget_keys_refuse_what_cannot_work():
    with pytest.raises(ConfigError, match="test_pool"):
        load_config(CONFIG, ["data.name=kvasir_seg", "data.test_pool=100"])
    with pytest.raises(ConfigError, match="n_val"):
        load_config(CONFIG, ["data.n_real=4", "data.n_val=4"])
    with pytest.raises(ConfigError, match="synthetic_only"):
        load_config(CONFIG, ["augment.method=standard", "augment.synthetic_only=true"])
    with pytest.raises(ConfigError, match="procedural_fundus has no lesion-free images"):
        load_config(CONFIG, ["data.name=procedural_fundus", "data.n_normal=64"])  # a grid fails before any cell
    assert load_config(CONFIG, ["data.name=procedural_fundus", "data.n_normal=0"]).data.n_normal == 0


def test_new_keys_at_neutral_values_keep_old_signatures(monkeypatch):
    cfgs = [load_config(CONFIG, [f"augment.method={m}"]) for m in ("diffusion", "copy_paste", "standard")]
    base = [pipeline.signatures(c) for c in cfgs]
    # what the signatures were before the keys existed: the same payloads without them
    monkeypatch.setitem(hashing.IGNORED, "data", hashing.IGNORED["data"] | {"n_val", "n_normal", "test_pool"})
    monkeypatch.setitem(hashing.IGNORED, "augment", {"synthetic_only"})
    assert [pipeline.signatures(c) for c in cfgs] == base
    monkeypatch.undo()
    for override in ("data.n_val=4", "data.n_normal=8", "data.test_pool=100"):
        changed = pipeline.signatures(load_config(CONFIG, [override]))
        assert all(changed[s] != base[0][s] for s in base[0])
    only = pipeline.signatures(load_config(CONFIG, ["augment.synthetic_only=true"]))
    assert only["validate"] == base[0]["validate"] and only["segment"] != base[0]["segment"]


def test_synthetic_only_trains_on_the_synthetic_pairs_alone(monkeypatch, tmp_path):
    from datamodules import augmented
    from experiments.stages import segment

    dm = _dm(n_real=8, n_val=2, test_pool=10)
    fake = list(range(5))
    monkeypatch.setattr(augmented, "synthetic_dataset", lambda *a, **k: fake)
    assert augmented.training_set(dm, "none", tmp_path, ratio=1.0, include_real=False) is fake
    assert len(augmented.training_set(dm, "none", tmp_path, ratio=1.0)) == 6 + 5
    monkeypatch.setattr(augmented, "synthetic_dataset", lambda *a, **k: None)
    with pytest.raises(DataError, match="synthetic_only"):
        augmented.training_set(dm, "none", tmp_path, ratio=1.0, include_real=False)

    seen = {}
    monkeypatch.setattr(segment, "training_set", lambda *a, **k: seen.update(k) or "train set")
    monkeypatch.setattr(segment, "fit_segmenter", lambda *a, **k: {"test/dice": 0.0})
    cfg = load_config(CONFIG, ["augment.synthetic_only=true"])
    segment.run_segment(cfg, dm, tmp_path, {"validate": tmp_path})
    assert seen["include_real"] is False


def test_normal_pool_is_where_normal_sources_come_from():
    masks = np.zeros((8, 4, 4), np.uint8)
    masks[:4, 1, 1] = 1  # rows 0-3 hold a lesion (the labelled pairs), 4-7 are the normal pool
    assert source_pool(masks, [0, 1, 2, 3], "normal", [6, 7]) == ([6, 7], "normal_image")
    assert source_pool(masks, [0, 1, 2, 3], "real", [6, 7]) == ([0, 1, 2, 3], "real")
    assert source_pool(masks, [0, 1, 2, 3], "normal", []) == ([0, 1, 2, 3], "lesion_free_region")
    dm = _dm(n_real=8, n_val=2, test_pool=10, n_normal=6)
    plan = Planner(dm.images, dm.masks, dm.ids, dm.split_indices["train_few"], seed=0, n_samples=12,
                   scale_range=(0.6, 1.4), elastic=0.2, mask_source="real", source="normal",
                   normal_indices=dm.split_indices["normal"])
    assert set(plan.order) == set(dm.split_indices["normal"])


GRIDS = Path(__file__).resolve().parents[1] / "sweeps" / "grids"
ARMS = {"real_only", "copy_paste", "diffusion", "diffusion_gate", "diffusion_base_only"}


@functools.lru_cache(maxsize=None)
def _cells(grid: str) -> tuple:
    from sweeps.grid import grid_cells

    return tuple(grid_cells(GRIDS / f"{grid}.yaml"))


@pytest.mark.parametrize("kind, n_seeds", [("polyp", 20), ("skin", 10), ("fundus", 10), ("ultrasound", 10)])
def test_headline_grids_load_with_their_seeds_and_arms(kind, n_seeds):
    cells = _cells(f"headline_{kind}")
    assert {c.variant for c in cells} == ARMS
    assert sorted({c.seed for c in cells}) == list(range(100, 100 + n_seeds))
    cfg = next(c for c in cells if c.variant == "diffusion_base_only" and c.seed == 101).config()
    assert cfg.data.name == f"procedural_{kind}" and cfg.data.procedural_seed == 101 and cfg.data.split_seed == 101
    assert (cfg.data.n_real, cfg.data.n_val, cfg.data.test_pool) == (16, 4, 1000)
    assert cfg.data.n_normal == (0 if kind == "fundus" else 64) and cfg.diffusion.finetune == "none"


def test_data_efficiency_grid_shares_the_headline_cells_at_16():
    cells = _cells("data_efficiency")
    assert {c.variant for c in cells} == {"real_only", "copy_paste", "diffusion", "synthetic_only"}
    assert sorted({c.seed for c in cells}) == list(range(100, 110))
    assert sorted({c.axes["data.n_real"] for c in cells}) == [8, 16, 32, 64]
    for c in (c for c in cells[:16] if c.variant == "synthetic_only"):  # seeds are outermost: seed 100
        cfg = c.config()
        assert cfg.data.n_val == cfg.data.n_real // 4 and cfg.augment.synthetic_only
    headline = {(c.variant, c.seed): c for c in _cells("headline_polyp")}
    for c in (c for c in cells if c.seed == 100 and c.axes["data.n_real"] == 16 and c.variant != "synthetic_only"):
        assert pipeline.signatures(c.config()) == pipeline.signatures(headline[(c.variant, 100)].config())


def test_data_inspect_reports_the_budget_and_the_normal_pool(make_dataset):
    from datamodules.inspect import inspect_dataset

    root = make_dataset("busi", n=6)
    report = inspect_dataset("busi", root, n_real=4, n_val=1, n_normal=2, test_fraction=0.2)
    assert report["splits"]["train_few"] == 3 and report["splits"]["val"] == 1 and report["splits"]["normal"] == 2
    assert not report["problems"]
    too_many = inspect_dataset("busi", root, n_real=4, n_val=1, n_normal=50, test_fraction=0.2)
    assert any("data.n_normal=50" in p for p in too_many["problems"])
