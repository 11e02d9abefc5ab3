from __future__ import annotations

import numpy as np
import pytest

from wsss.config import SynthConfig
from wsss.data.dataset import load_voc
from wsss.data.synth import generate, render_sample
from wsss.errors import DataError
from wsss.io import read_mask

SMALL = dict(n_train=12, n_val=4, size=64)


def test_render_is_deterministic_and_seeded():
    cfg = SynthConfig(**SMALL)
    a, b = render_sample(cfg, 3), render_sample(cfg, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
    c = render_sample(SynthConfig(**SMALL, seed=1), 3)
    assert not np.array_equal(a[0], c[0])


def test_render_consistency():
    cfg = SynthConfig(n_train=40, size=96)
    multi = 0
    for i in range(40):
        img, mask, part, labels = render_sample(cfg, i)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and mask.shape == (96, 96)
        assert labels, "every image has at least one label"
        assert set(np.unique(mask)) - {0} == set(labels), "mask classes == image labels"
        assert ((part > 0) <= (mask > 0)).all() and (part[part > 0] == mask[part > 0]).all()
        assert set(np.unique(part)) - {0} == set(labels), "every labelled class has a visible part"
        # the part is a small share of the object: the discriminative-part difficulty
        assert (part > 0).sum() < 0.5 * (mask > 0).sum()
        multi += len(labels) > 1
    assert multi >= 8, "classes should co-occur"


def test_generate_layout_reuse_and_conflict(tmp_path):
    cfg = SynthConfig(**SMALL)
    out = generate(cfg, tmp_path / "s")
    tr, va = load_voc(out, "train"), load_voc(out, "val")
    assert len(tr) == 12 and len(va) == 4 and tr.classes[0] == "background" and tr.has_masks
    m = read_mask(tr.samples[0].mask)
    assert m.shape == (64, 64)
    img_before = (out / "JPEGImages" / "train_00000.jpg").read_bytes()
    generate(cfg, out)  # same parameters: reused
    with pytest.raises(DataError, match="other parameters"):
        generate(SynthConfig(**SMALL, seed=9), out)
    generate(SynthConfig(**SMALL, seed=9), out, force=True)
    assert (out / "JPEGImages" / "train_00000.jpg").read_bytes() != img_before


def test_generate_is_byte_identical_across_runs(tmp_path):
    cfg = SynthConfig(**SMALL)
    a, b = generate(cfg, tmp_path / "a"), generate(cfg, tmp_path / "b")
    for rel in ["JPEGImages/train_00003.jpg", "SegmentationClass/val_00013.png", "labels.csv"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_generate_refuses_non_empty_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate(SynthConfig(**SMALL), tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
