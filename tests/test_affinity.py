"""The affinity stage's core on tiny synthetic arrays: pairs, labels, loss, transition matrix, walk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsss.affinity import (AffinityHead, affinity_loss, grid_labels, grid_size, pair_affinities, pair_indices, pair_offsets,
                           random_walk, refine_maps, transition_matrix)
from wsss.io import IGNORE


def two_region_embedding(h: int = 6, w: int = 8, split: int = 4, far: float = 50.0) -> torch.Tensor:
    """``(2, h, w)``: columns left of ``split`` embed at 0, the rest at ``far`` (affinity ~0 across)."""
    emb = torch.zeros(2, h, w)
    emb[:, :, split:] = far
    return emb


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_pair_offsets_cover_the_disc_once(radius):
    off = pair_offsets(radius)
    assert len(set(off)) == len(off)
    assert all((-dy, -dx) not in off for dy, dx in off), "each symmetric pair appears once"
    disc = {(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx <= radius * radius}
    assert set(off) | {(-dy, -dx) for dy, dx in off} == disc
    with pytest.raises(ValueError):
        pair_offsets(0)


def test_pair_affinities_match_a_direct_computation():
    torch.manual_seed(0)
    emb = torch.randn(3, 4, 5)
    off = pair_offsets(2)
    a = pair_affinities(emb, off)
    p, q = pair_indices(4, 5, off)
    flat = emb.flatten(1)
    direct = torch.exp(-(flat[:, p] - flat[:, q]).abs().mean(0))
    assert a.shape == p.shape and torch.allclose(a, direct)
    # every pair is inside the grid and within the radius
    py, px, qy, qx = p // 5, p % 5, q // 5, q % 5
    assert ((qy - py) ** 2 + (qx - px) ** 2 <= 4).all() and (p != q).all()
    assert torch.allclose(pair_affinities(torch.ones(3, 4, 5), off), torch.ones(len(p)))


def test_grid_labels_vote_per_cell_and_leave_the_input_alone():
    mask = np.zeros((20, 20), np.uint8)
    mask[:16, :8] = 2  # cells (0,0) (1,0) fully class 2
    mask[:8, 8:12] = 1  # half of cell (0,1): no majority above 0.75 -> ignore
    mask[16:, 16:] = IGNORE
    mask[0, 19] = 9  # id >= num_classes counts as unknown
    before = mask.copy()
    lab = grid_labels(mask, 3, 0.75)
    assert np.array_equal(mask, before)
    assert lab.shape == grid_size(20, 20) == (3, 3)
    assert lab[0, 0] == 2 and lab[1, 0] == 2 and lab[0, 1] == IGNORE
    assert lab[1, 1] == 0  # all background
    assert lab[2, 2] == IGNORE  # 4x4 real pixels, all ignore, the rest padding
    with pytest.raises(ValueError):
        grid_labels(mask[None], 3, 0.75)


def test_affinity_loss_prefers_embeddings_that_separate_labels():
    labels = torch.zeros(6, 8, dtype=torch.long)
    labels[:, 4:] = 1
    labels[0, 0] = IGNORE
    off = pair_offsets(2)
    separated = affinity_loss(two_region_embedding(), labels, off)
    constant = affinity_loss(torch.zeros(2, 6, 8), labels, off)
    assert separated is not None and constant is not None
    assert float(separated) < 0.01 < 1.0 < float(constant)
    assert affinity_loss(torch.zeros(2, 6, 8), torch.full((6, 8), IGNORE), off) is None
    emb = torch.randn(2, 6, 8, requires_grad=True)
    affinity_loss(emb, labels, off).backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_transition_matrix_is_row_stochastic_and_local():
    emb = torch.randn(4, 5, 6)
    t = transition_matrix(emb, radius=2, beta=4.0).to_dense()
    assert t.shape == (30, 30) and (t >= 0).all()
    assert torch.allclose(t.sum(1), torch.ones(30), atol=1e-5)
    ys, xs = torch.div(torch.arange(30), 6, rounding_mode="floor"), torch.arange(30) % 6
    far = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 > 4
    assert (t[far] == 0).all()


def test_random_walk_spreads_within_a_region_but_not_across_an_edge():
    emb = two_region_embedding()
    t = transition_matrix(emb, radius=3, beta=8.0)
    maps = torch.zeros(1, 6, 8)
    maps[0, 2, 1] = 1.0  # a peak in the left region
    before = maps.clone()
    walked = random_walk(maps, t, steps=200)
    assert torch.equal(maps, before)
    left, right = walked[0, :, :4], walked[0, :, 4:]
    assert right.max() < 1e-6 and left.min() > 0.5 * left.max(), "fills its region, stops at the edge"
    const = torch.full((2, 6, 8), 0.3)
    assert torch.allclose(random_walk(const, t, steps=50), const, atol=1e-5)


def test_refine_maps_shapes_range_and_edges():
    emb = two_region_embedding(h=4, w=5, split=2)  # grid of a 30 x 36 image
    cams = np.zeros((2, 30, 36), np.float32)
    cams[0, 4:12, 2:10] = 1.0  # a peak inside the left region (x < 16)
    cams[1, 10:20, 26:34] = 0.6
    before = cams.copy()
    out = refine_maps(cams, emb, radius=2, beta=8.0, steps=100)
    assert np.array_equal(cams, before)
    assert out.shape == cams.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert out.min() >= 0 and np.allclose(out.reshape(2, -1).max(1), 1.0)
    assert out[0, :, :14].mean() > 0.5 and out[0, :, 20:].max() < 1e-3, "class 0 fills the left region only"
    assert refine_maps(np.zeros((0, 30, 36), np.float32), emb, 2, 8.0, 10).shape == (0, 30, 36)
    with pytest.raises(ValueError, match="grid"):
        refine_maps(np.zeros((1, 60, 36), np.float32), emb, 2, 8.0, 10)


def test_refine_maps_image_normalisation_keeps_a_washed_out_class_weak():
    emb = two_region_embedding(h=4, w=5, split=2)
    cams = np.zeros((2, 30, 36), np.float32)
    cams[0, :, :14] = 1.0  # fills the left region: the walk keeps it
    cams[1, 2:6, 20:24] = 1.0  # one small blob in the right region: the walk averages it out
    before = cams.copy()
    per_class = refine_maps(cams, emb, radius=2, beta=8.0, steps=100)
    per_image = refine_maps(cams, emb, radius=2, beta=8.0, steps=100, normalise="image")
    assert np.array_equal(cams, before)
    assert per_image.shape == cams.shape and per_image.dtype == np.float32 and np.isfinite(per_image).all()
    assert np.isclose(per_image.max(), 1.0) and per_image.min() >= 0
    # same maps up to one factor per class; the blob's class is stretched to 1 per class, not per image
    assert np.allclose(per_image[0], per_class[0], atol=1e-5)
    assert per_class[1].max() == pytest.approx(1.0) and per_image[1].max() < 0.5
    ratio = per_image[1][per_class[1] > 0.1] / per_class[1][per_class[1] > 0.1]
    assert np.allclose(ratio, ratio[0], rtol=1e-4)
    with pytest.raises(ValueError, match="normalise"):
        refine_maps(cams, emb, 2, 8.0, 10, normalise="pixel")


def test_affinity_head_shapes_and_gradient():
    head = AffinityHead([8, 16, 32], width=8, dim=5)
    levels = [torch.randn(2, 8, 10, 13), torch.randn(2, 16, 5, 7), torch.randn(2, 32, 3, 4)]
    out = head(levels, (5, 7))
    assert out.shape == (2, 5, 5, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="levels"):
        head(levels[:2], (5, 7))


def test_head_and_walk_keys_ignore_only_what_they_do_not_read(tmp_path):
    """The head is reused across runs that differ only in the walk's settings or the final CRF's
    thresholds, the walked maps only across the thresholds; any other affinity setting, the seed or an
    input makes new ones (and stale files are removed)."""
    from types import SimpleNamespace

    from wsss.config import load_config
    from wsss.manifest import keep_keyed_outputs as _keep_outputs
    from wsss.stages.affinity import HEAD_MARKER, HEAD_OUTPUTS, WALK_MARKER, WALK_OUTPUTS, _keys

    def keys(*over, crf_key="c1"):
        cfg = load_config(None, ["crf.source=cam", *over])
        ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, manifest_key=lambda name, hint: {"crf": crf_key}.get(name, name))
        return _keys(ctx)

    head, walk = keys()
    assert keys("affinity.fg_threshold=0.6", "affinity.low_threshold=0.1") == (head, walk) == keys("affinity.device=cpu")
    assert keys("crf.fg_threshold=0.5") == (head, walk)  # the crf section reaches the head only through the crf stage's key
    for walk_only in ("affinity.beta=8", "affinity.steps=64", "affinity.normalise=image"):
        h, w = keys(walk_only)
        assert h == head and w != walk, walk_only
    for other in (keys("affinity.epochs=3"), keys("affinity.radius=3"), keys("run.seed=1"), keys(crf_key="c2")):
        assert other[0] != head and other[1] != walk

    out = tmp_path / "affinity"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "a.npz").write_bytes(b"x")
    (out / "head.pt").write_bytes(b"x")
    (out / HEAD_MARKER).write_text(head + "\n")
    (out / WALK_MARKER).write_text(walk + "\n")
    # another walk length: the head stays, the maps go
    h, w = keys("affinity.steps=64")
    assert _keep_outputs(out, HEAD_MARKER, HEAD_OUTPUTS, h, force=False) and (out / "head.pt").is_file()
    assert not _keep_outputs(out, WALK_MARKER, WALK_OUTPUTS, w, force=False) and not (out / "maps").exists()
    assert (out / WALK_MARKER).read_text().strip() == w
    # force, or a new head key, removes the head too
    assert not _keep_outputs(out, HEAD_MARKER, HEAD_OUTPUTS, h, force=True) and not (out / "head.pt").exists()
    (out / "head.pt").write_bytes(b"x")
    h2, _ = keys("affinity.epochs=3")
    assert not _keep_outputs(out, HEAD_MARKER, HEAD_OUTPUTS, h2, force=False) and not (out / "head.pt").exists()
    assert (out / HEAD_MARKER).read_text().strip() == h2
