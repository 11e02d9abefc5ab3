"""Image-specific prototype refinement of CAMs (``cam.refine: prototype``): the core on synthetic
features, extraction with it, config checks and the cam stage wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsss.cam import create_cam_method, extract_cams
from wsss.cam.prototype import PrototypeRefiner, grid_features, prototype_maps, seed_cells
from wsss.config import load_config
from wsss.errors import ConfigError
from tests.helpers import tiny_cam_classifier


def _scene(h: int = 48, w: int = 64):
    """One object (rows 8-31, cols 8-31) with feature A on a background of feature B; its CAM is 1 on
    the object's centre, 0.6 on the rest of it and 0.4 on a band of background it 'co-occurs' with
    (cols 32-47), 0 elsewhere. Returns (levels, cams (1, H, W), object mask, band mask)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[8:32, 8:32] = True
    band = torch.zeros(h, w, dtype=torch.bool)
    band[8:32, 32:48] = True
    # features on a stride-4 grid, with a little noise
    small_obj = obj[::4, ::4]
    fh, fw = small_obj.shape
    f = torch.where(small_obj[None], a[:, None, None], b[:, None, None]) + 0.05 * torch.randn(16, fh, fw, generator=g)
    cam = torch.zeros(1, h, w)
    cam[0][obj] = 0.6
    cam[0, 12:28, 12:28] = 1.0
    cam[0][band] = 0.4
    return [f, f[:8, ::2, ::2].clone()], cam, obj, band


def test_co_occurring_background_falls_to_zero_and_the_object_stays():
    levels, cam, obj, band = _scene()
    out = prototype_maps(levels, cam)
    assert out.shape == cam.shape and out.dtype == torch.float32
    assert float(out[0][obj].mean()) > 0.8, "the object keeps a high score"
    assert float(out[0][band].mean()) < 0.1, "background the CAM spilled onto falls back"
    # the plain CAM thresholded where it keeps the whole object also keeps the band (IoU 0.6); the refined
    # map loses only the edges that the stride-8 grid blurs
    iou = lambda m: float((m & obj).sum() / (m | obj).sum())  # noqa: E731
    assert iou(cam[0] > 0.3) == pytest.approx(0.6)
    assert iou(out[0] > 0.3) > 0.75


def test_shapes_range_no_nan_and_inputs_untouched():
    levels, cam, _, _ = _scene(45, 61)  # sizes not divisible by the grid
    cam2 = torch.cat([cam, cam.flip(-1) * 0.7])
    copies = [l.clone() for l in levels], cam2.clone()
    out = prototype_maps(levels, cam2, fg=0.5, bg=0.15)
    assert out.shape == (2, 45, 61)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1 + 1e-6
    assert torch.allclose(out.flatten(1).amax(1), torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(levels, copies[0])) and torch.equal(cam2, copies[1])


def test_no_classes_and_missing_seeds():
    levels, cam, _, _ = _scene()
    assert prototype_maps(levels, cam[:0]).shape == (0, 48, 64)
    # every cell confident (no background seed) and a class below fg everywhere: both fall back to one cell
    flat = torch.full((2, 48, 64), 0.9)
    flat[1] = 0.2
    out = prototype_maps(levels, flat)
    assert torch.isfinite(out).all()
    seeds = seed_cells(torch.nn.functional.avg_pool2d(flat[None], 8)[0], 0.5, 0.15)
    assert seeds.shape == (3, 6, 8) and seeds.flatten(1).sum(1).tolist()[0] == 1 and seeds[2].sum() == 1


def test_bad_arguments():
    levels, cam, _, _ = _scene()
    with pytest.raises(ValueError, match=r"\(k, H, W\)"):
        prototype_maps(levels, cam[0])
    with pytest.raises(ValueError, match="at least one feature level"):
        prototype_maps([], cam)
    with pytest.raises(ValueError, match="bg <= fg"):
        prototype_maps(levels, cam, fg=0.2, bg=0.5)


def test_every_level_weighs_the_same():
    f = grid_features([torch.randn(4, 5, 5) * 100, torch.randn(64, 3, 3)], (40, 40))
    assert f.shape == (68, 5, 5)
    assert torch.allclose(f[:4].norm(dim=0), torch.ones(5, 5), atol=1e-5)
    assert torch.allclose(f[4:].norm(dim=0), torch.ones(5, 5), atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return tiny_cam_classifier()


def _images():
    rng = np.random.default_rng(1)
    return [(f"i{n}", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), lab) for n, lab in enumerate([(1,), (2, 4), ()])]


def test_extraction_with_the_refiner_batched_equals_one_by_one(model):
    method = create_cam_method("cam", model)
    refine = PrototypeRefiner(model.backbone)
    kw = dict(mean=(0.5,) * 3, std=(0.5,) * 3, scales=(1.0, 0.5), flip=True, refine=refine)
    batched = {sid: m for sid, _, m in extract_cams(method, _images(), batch_size=4, **kw)}
    single = {sid: m for sid, _, m in extract_cams(method, _images(), batch_size=1, **kw)}
    plain = {sid: m for sid, _, m in extract_cams(method, _images(), **{**kw, "refine": None})}
    for sid, img, lab in _images():
        assert batched[sid].shape == (len(lab), 40, 48)
        assert np.allclose(batched[sid], single[sid], atol=1e-5)
        if lab:
            assert np.allclose(batched[sid].reshape(len(lab), -1).max(1), 1.0, atol=1e-5)
            assert not np.allclose(batched[sid], plain[sid], atol=1e-3), "the refiner changed nothing"


def test_a_backbone_without_levels_is_a_config_error():
    class Flat(torch.nn.Module):
        level_channels = ()

    with pytest.raises(ConfigError, match="multi-level features"):
        PrototypeRefiner(Flat())


def test_config_checks(tmp_path):
    with pytest.raises(ConfigError, match="prototype_bg"):
        load_config("configs/demo.yaml", ["cam.refine=prototype", "cam.prototype_fg=0.1", "cam.prototype_bg=0.3"])
    with pytest.raises(ConfigError, match="refine"):
        load_config("configs/demo.yaml", ["cam.refine=sipe"])


def test_cam_stage_applies_it_and_keys_it(tmp_path, run_cli):
    from wsss.camfile import load_cam

    tiny = ["data.synth.n_train=8", "data.synth.n_val=4", "data.synth.size=64", "train_cls.epochs=1", "train_cls.crop_size=64",
            "cam.scales=[1.0]", "run.gallery_images=0"]
    run = tmp_path / "run"
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={run}", *tiny, "--to", "cam")
    assert code == 0, err
    plain = {p.name: load_cam(p)[1] for p in sorted((run / "cam").glob("*.npz"))}
    code, _, err = run_cli("cam", "configs/demo.yaml", f"run.out_dir={run}", *tiny, "cam.refine=prototype")
    assert code == 0, err
    manifest = json.loads((run / "cam" / "manifest.json").read_text())
    assert manifest["config"]["refine"] == "prototype"
    refined = {p.name: load_cam(p)[1] for p in sorted((run / "cam").glob("*.npz"))}
    assert refined.keys() == plain.keys()
    changed = [n for n in plain if plain[n].size and not np.allclose(plain[n], refined[n], atol=1e-2)]
    assert changed, "every map was reused or unchanged: the setting is not in the stage's key"
