"""Copy-paste control on tiny 32-px arrays."""
import numpy as np
import pytest
from scipy import ndimage

from lightning_modules.synthesis.copy_paste import copy_paste, donor_mask, lesion_components
from lightning_modules.synthesis.masks import disk

S = 32


def _circle(cy, cx, r, size=S):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _scene(background, lesion=None, seed=0):
    """Textured background; optional red lesion in the upper left."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(background, np.float32) + rng.normal(0, 6, (S, S, 3)), 0, 255)
    mask = np.zeros((S, S), np.uint8)
    if lesion is not None:
        region = _circle(9, 9, 5)
        img[region] = np.clip(np.array(lesion, np.float32) + rng.normal(0, 6, (region.sum(), 3)), 0, 255)
        mask[region] = 1
    return img.astype(np.uint8), mask


@pytest.fixture
def donor():
    return _scene((120, 120, 120), lesion=(200, 60, 60), seed=1)


@pytest.fixture
def new_mask():
    m = np.zeros((S, S), np.uint8)
    m[_circle(22, 21, 6)] = 1
    return m


def test_changes_only_pixels_in_or_near_the_mask(donor, new_mask):
    image, _ = _scene((120, 120, 120), seed=2)
    out = copy_paste(image, new_mask, donor[0], donor[1], angle=30.0, feather_px=1.0)
    assert out.dtype == np.uint8 and out.shape == image.shape
    changed = np.any(out != image, axis=-1)
    near = ndimage.binary_dilation(new_mask > 0, disk(4))
    assert not changed[~near].any(), "pixels far from the mask changed"
    assert changed[new_mask > 0].mean() > 0.9


def test_pasted_lesion_keeps_its_colour_relation(donor, new_mask):
    image, _ = _scene((120, 120, 120), seed=2)
    out = copy_paste(image, new_mask, donor[0], donor[1]).astype(float)
    inside = out[new_mask > 0].mean(0)
    assert inside[0] > 170 and inside[1] < 100, f"not lesion-like: {inside}"
    # On a darker background the lesion stays "redder than its surroundings", shifted with it.
    dark, _ = _scene((70, 50, 50), seed=3)
    out_dark = copy_paste(dark, new_mask, donor[0], donor[1]).astype(float)
    inside_dark = out_dark[new_mask > 0].mean(0)
    ring = ndimage.binary_dilation(new_mask > 0, disk(4)) & ~ndimage.binary_dilation(new_mask > 0, disk(2))
    surround = out_dark[ring].mean(0)
    assert inside_dark[0] - surround[0] > 40
    assert inside_dark[0] < inside[0]


def test_the_recorded_angle_decides_the_texture_and_the_inputs_stay_untouched(donor, new_mask):
    image, _ = _scene((120, 120, 120), seed=2)
    kept = image.copy(), donor[0].copy(), donor[1].copy(), new_mask.copy()
    turned = copy_paste(image, new_mask, donor[0], donor[1], angle=45.0)
    straight = copy_paste(image, new_mask, donor[0], donor[1], angle=0.0)
    inside = new_mask > 0
    assert np.abs(turned[inside].astype(int) - straight[inside].astype(int)).mean() > 1  # the angle is used
    np.testing.assert_array_equal(turned[~inside & (ndimage.distance_transform_edt(~inside) > 6)],
                                  image[~inside & (ndimage.distance_transform_edt(~inside) > 6)])
    for before, after in zip(kept, (image, donor[0], donor[1], new_mask)):
        np.testing.assert_array_equal(before, after)  # pasting never writes into its inputs


def test_multiclass_nested_paste():
    img = np.full((S, S, 3), 90, np.uint8)
    dmask = np.zeros((S, S), np.uint8)
    dmask[_circle(10, 10, 7)] = 1
    dmask[_circle(10, 10, 3)] = 2
    img[dmask == 1] = (220, 180, 90)
    img[dmask == 2] = (250, 240, 200)
    new = np.zeros((S, S), np.uint8)
    new[_circle(22, 22, 7)] = 1
    new[_circle(22, 22, 3)] = 2
    target = np.full((S, S, 3), 90, np.uint8)
    out = copy_paste(target, new, img, dmask).astype(float)
    cup, rim = out[new == 2].mean(0), out[new == 1].mean(0)
    assert cup.mean() > rim.mean() > 120  # bright cup inside a disc, both brighter than fundus


def test_donor_components_only_from_given_rows():
    masks = np.zeros((3, S, S), np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[0, 20:25, 20:25] = 1
    masks[2, 10:15, 10:15] = 1
    comps = lesion_components(masks, [0, 1])
    assert comps == [(0, 1), (0, 2)]
    d = donor_mask(masks, 0, 2)
    assert d.sum() == 25 and d[22, 22] == 1 and d[3, 3] == 0
    with pytest.raises(ValueError, match="train_few"):
        lesion_components(masks, [1])


def test_vessels_around_the_new_lesion_do_not_change_its_colour(donor, new_mask):
    """A few dark vessels crossing the target surroundings must not darken or re-contrast the paste."""
    clean, _ = _scene((120, 120, 120), seed=2)
    vessels = clean.copy()
    vessels[:, 12:14] = 30  # two dark vertical vessels through the ring around the new mask
    vessels[28:30, :] = 30
    inside = new_mask > 0
    inside &= ~np.isin(np.arange(S), [12, 13])[None, :] & ~np.isin(np.arange(S), [28, 29])[:, None]
    on_clean = copy_paste(clean, new_mask, donor[0], donor[1], feather_px=1.0)[inside].astype(float)
    on_vessels = copy_paste(vessels, new_mask, donor[0], donor[1], feather_px=1.0)[inside].astype(float)
    assert np.abs(on_clean.mean(0) - on_vessels.mean(0)).max() < 8
    assert on_vessels.std(0).max() < 1.3 * on_clean.std(0).max() + 1
