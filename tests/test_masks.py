"""Mask generator, sources and erosion on tiny 32-px arrays."""
import json

import numpy as np
import pytest
from scipy import ndimage

from lightning_modules.gating.erosion import erode_mask
from lightning_modules.synthesis.masks import MaskGenerationError, MaskGenerator, disk, fov_from_image
from lightning_modules.synthesis.sources import pick_sources, source_pool, union_label

S = 32


def _circle(cy, cx, r, size=S):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.fixture
def bank():
    masks = np.zeros((4, S, S), np.uint8)
    masks[0][_circle(8, 9, 4)] = 1
    masks[1][_circle(20, 20, 5)] = 1
    masks[2][5:10, 18:27] = 1
    return masks  # masks[3] is lesion-free


FOV = _circle(15.5, 15.5, 15)


@pytest.mark.parametrize("mask_source", ["real", "blob", "mixed"])
def test_inside_fov_away_from_lesions_and_reproducible(bank, mask_source):
    gen = MaskGenerator(bank, FOV, (0.6, 1.4), 0.3, mask_source)
    occupied = bank[1] > 0
    near = ndimage.binary_dilation(occupied, disk(gen.margin_px))
    for seed in range(12):
        mask, params = gen.sample(np.random.default_rng(seed), occupied)
        assert mask.dtype == np.uint8 and mask.shape == (S, S) and mask.any()
        assert not mask[~FOV].any(), "mask leaves the field of view"
        assert not (mask.astype(bool) & near).any(), "mask touches an existing lesion"
        restored = json.loads(json.dumps(params))  # survives the manifest round trip
        np.testing.assert_array_equal(gen.render(restored), mask)
        assert mask_source == "mixed" or params["shape"] == mask_source
        for key in ("shape", "scale", "angle", "dx", "dy", "jitter_seed", "morph_op", "elastic"):
            assert key in params


def test_same_seed_same_mask_different_seed_differs(bank):
    gen = MaskGenerator(bank, FOV, (0.6, 1.4), 0.2, "mixed")
    a, pa = gen.sample(np.random.default_rng(7), bank[0] > 0)
    b, pb = MaskGenerator(bank, FOV, (0.6, 1.4), 0.2, "mixed").sample(np.random.default_rng(7), bank[0] > 0)
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    others = [gen.sample(np.random.default_rng(s), bank[0] > 0)[0] for s in range(8, 12)]
    assert any(not np.array_equal(a, o) for o in others)


def test_real_shape_records_its_component(bank):
    gen = MaskGenerator(bank, None, (1.0, 1.0), 0.0, "real")
    _, p = gen.sample(np.random.default_rng(0), None)
    comp = gen.components[p["component"]]
    assert (comp[1], comp[2]) == (p["source_mask_index"], p["component_label"])
    assert p["source_mask_index"] in (0, 1, 2)


def test_no_room_is_a_clear_error(bank):
    gen = MaskGenerator(bank, FOV, (1.0, 1.2), 0.0, "blob", max_tries=3)
    with pytest.raises(MaskGenerationError, match="no valid lesion placement after 3 tries"):
        gen.sample(np.random.default_rng(0), np.ones((S, S), bool))


def test_real_mode_without_lesions_is_an_error():
    with pytest.raises(MaskGenerationError, match="mask_source"):
        MaskGenerator(np.zeros((2, S, S), np.uint8), None, (1, 1), 0.0, "real")


def test_multiclass_cup_stays_inside_disc():
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[:, _circle(30, 30, 10, 64)] = 1
    masks[:, _circle(30, 31, 5, 64)] = 2
    gen = MaskGenerator(masks, None, (0.7, 1.2), 0.2, "mixed")
    for seed in range(6):
        mask, p = gen.sample(np.random.default_rng(seed), masks[0] > 0)
        assert set(np.unique(mask)) == {0, 1, 2}
        assert not ((mask == 2) & ~ndimage.binary_erosion(mask > 0)).any(), "cup touches the disc edge"
        np.testing.assert_array_equal(gen.render(p), mask)


def test_fov_from_image_is_the_non_black_disc():
    img = np.zeros((S, S, 3), np.uint8)
    img[FOV] = (150, 90, 80)
    img[12:16, 12:16] = 5  # a dark spot inside the FOV is still inside
    fov = fov_from_image(img, margin_px=0)
    assert fov[14, 14] and not fov[0, 0]
    assert abs(int(fov.sum()) - int(FOV.sum())) < 0.05 * FOV.sum()
    assert fov_from_image(np.full((S, S, 3), 200, np.uint8)).all()


def test_sources_only_train_and_union_label(bank):
    images = np.full((4, S, S, 3), 120, np.uint8)
    ids = ["a", "b", "c", "d"]
    train = [0, 1, 3]  # row 2 is val/test: never a source
    real = pick_sources(images, bank, ids, train, 9, np.random.default_rng(0), "real")
    assert sorted({s.index for s in real}) == [0, 1, 3]
    assert [s.index for s in real].count(0) == 3  # balanced passes over the pool
    normal = pick_sources(images, bank, ids, train, 4, np.random.default_rng(0), "normal")
    assert {s.index for s in normal} == {3} and normal[0].kind == "normal_image"
    assert source_pool(bank, [0, 1], "normal") == ([0, 1], "lesion_free_region")
    region = pick_sources(images, bank, ids, [0], 1, np.random.default_rng(0), "normal")[0]
    assert region.occupied.sum() == (bank[0] > 0).sum()
    new = np.zeros((S, S), np.uint8)
    new[25:28, 3:6] = 1
    label = union_label(region.existing, new)
    assert (label[bank[0] > 0] == 1).all() and (label[new > 0] == 1).all()
    assert label.sum() == (bank[0] > 0).sum() + 9


def test_erosion_shrinks_and_keeps_nesting():
    m = np.zeros((S, S), np.uint8)
    m[_circle(16, 16, 10)] = 1
    m[_circle(16, 16, 5)] = 2
    e = erode_mask(m, 2)
    assert (e > 0).sum() < (m > 0).sum() and (e == 2).sum() < (m == 2).sum()
    assert not ((e > 0) & (m == 0)).any()
    assert not ((e == 2) & ~ndimage.binary_erosion(e > 0)).any()  # cup still inside disc
    assert (e[16, 16], e[16, 9]) == (2, 1)  # shaved cup pixels become disc, not background
    np.testing.assert_array_equal(erode_mask(m, 0), m)


def test_erosion_keeps_thin_lesions_and_image_border():
    m = np.zeros((S, S), np.uint8)
    m[10:13, 5:20] = 1  # 3 px thick: a 2-px erosion would erase it
    m[0:8, 0:8] = 1  # touches the image border
    e = erode_mask(m, 2)
    assert e[10:13, 5:20].any()
    assert e[0, 0] == 1  # the image edge is not a lesion boundary
    assert not erode_mask(m, 2, keep_nonempty=False)[10:13, 8:17].any()
