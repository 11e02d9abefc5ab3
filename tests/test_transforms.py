from __future__ import annotations

import numpy as np
import pytest

from wsss.data.transforms import (ColorJitter, Compose, HFlip, RandomCrop, RandomScale, Resize, check_pair,
                                  pad_pair, resize_pair, to_tensor)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    mask = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(37, 53))
    return img, mask


ALL = [Resize(long_side=80), Resize(size=(20, 20)), RandomScale(0.5, 2.0), RandomCrop(64), RandomCrop(16), HFlip(1.0),
       ColorJitter(0.4, 0.4, 0.4, 0.05), Compose([RandomScale(0.7, 1.3), HFlip(0.5), RandomCrop(32)])]


@pytest.mark.parametrize("t", ALL, ids=lambda t: type(t).__name__)
def test_paired_transform_contract(t, pair):
    img, mask = pair
    img0, mask0 = img.copy(), mask.copy()
    out_img, out_mask = t(img, mask, np.random.default_rng(1))
    assert np.array_equal(img, img0) and np.array_equal(mask, mask0), "input modified"
    check_pair(out_img, out_mask)
    assert set(np.unique(out_mask)) <= {0, 1, 2, 255}, "a mask transform invented ids"
    again = t(img, mask, np.random.default_rng(1))
    assert np.array_equal(out_img, again[0]) and np.array_equal(out_mask, again[1]), "not deterministic in its rng"


def test_mask_resize_is_nearest_exact():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    img = np.zeros((2, 2, 3), np.uint8)
    _, m = resize_pair(img, mask, (4, 4))
    assert m.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]


def test_crop_pads_mask_with_ignore():
    img = np.full((10, 10, 3), 7, np.uint8)
    mask = np.zeros((10, 10), np.uint8)
    out_img, out_mask = RandomCrop(20)(img, mask, np.random.default_rng(0))
    assert out_img.shape == (20, 20, 3)
    assert (out_mask[10:, :] == 255).all() and (out_mask[:, 10:] == 255).all() and (out_mask[:10, :10] == 0).all()
    assert (out_img[15, 15] == RandomCrop().fill).all()


def test_flip_keeps_pixels_paired(pair):
    img, mask = pair
    fi, fm = HFlip(1.0)(img, mask, np.random.default_rng(0))
    assert np.array_equal(fi[:, 0], img[:, -1]) and np.array_equal(fm[:, 0], mask[:, -1])


def test_color_jitter_leaves_mask(pair):
    img, mask = pair
    _, m = ColorJitter(0.5, 0.5, 0.5, 0.1)(img, mask, np.random.default_rng(0))
    assert np.array_equal(m, mask)


@pytest.mark.parametrize("img,mask,msg", [
    (np.zeros((4, 4), np.uint8), None, "image must be"),
    (np.zeros((4, 4, 3), np.float32), None, "image must be"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), "differs"),
    (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), "mask must be"),
])
def test_shape_checks(img, mask, msg):
    with pytest.raises(ValueError, match=msg):
        HFlip()(img, mask, np.random.default_rng(0))


def test_pad_and_to_tensor():
    img, m = pad_pair(np.zeros((3, 4, 3), np.uint8), np.zeros((3, 4), np.uint8), (5, 5))
    assert img.shape == (5, 5, 3) and m[4, 4] == 255
    t = to_tensor(np.full((2, 3, 3), 255, np.uint8), mean=(0, 0, 0), std=(1, 1, 1))
    assert tuple(t.shape) == (3, 2, 3) and float(t.max()) == 1.0
