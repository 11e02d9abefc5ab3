from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from wsss.cam import CAM_METHODS, create_cam_method, extract_cams
from wsss.cam.extract import max_normalise
from wsss.errors import ConfigError, DataError
from wsss.evaluation import cams_to_mask, sweep_cam_thresholds
from wsss.evaluation.metrics import confusion, miou
from tests.helpers import tiny_cam_classifier
from wsss.camfile import load_cam, save_cam


@pytest.fixture(scope="module")
def model():
    return tiny_cam_classifier()


class CAMMethodTester:
    name: str
    scale_equivariant = True  # maps scale with the class weights (no normalisation inside)

    def test_shapes_values_and_input_untouched(self, model):
        method = create_cam_method(self.name, model)
        x = torch.randn(3, 3, 40, 48)
        x0 = x.clone()
        maps = method(x, torch.tensor([2, 0]))
        assert torch.equal(x, x0), "input modified"
        assert maps.shape == (3, 2, 5, 6) and maps.dtype == torch.float32
        assert torch.isfinite(maps).all() and (maps >= 0).all()

    def test_all_classes_at_once_equals_one_at_a_time(self, model):
        method = create_cam_method(self.name, model)
        x = torch.randn(2, 3, 32, 32)
        both = method(x, torch.tensor([1, 3]))
        one = torch.cat([method(x, torch.tensor([1])), method(x, torch.tensor([3]))], 1)
        assert torch.allclose(both, one, atol=1e-5)

    def test_raw_maps_are_not_min_max_normalised(self, model):
        method = create_cam_method(self.name, model)
        if not self.scale_equivariant:  # its weights ignore the gradient scale: check maxima vary instead
            m = method(torch.randn(2, 3, 32, 32) * torch.tensor([1.0, 3.0])[:, None, None, None], torch.tensor([0]))
            peaks = m.amax(dim=(1, 2, 3))
            assert not torch.allclose(peaks, torch.ones(2)) and not torch.allclose(peaks[0], peaks[1])
            return
        x = torch.randn(1, 3, 32, 32)
        base = method(x, torch.tensor([0]))
        w = model.classifier.weight.data
        saved = w.clone()
        try:
            w[0] *= 2.0
            doubled = method(x, torch.tensor([0]))
        finally:
            w.copy_(saved)
        assert torch.allclose(doubled, 2 * base, rtol=1e-4, atol=1e-6)


class TestCAM(CAMMethodTester):
    name = "cam"


class GradTester(CAMMethodTester):
    def test_matches_pytorch_grad_cam_up_to_its_normalisation(self, model):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        backend = CAM_METHODS.get(self.name).backend
        x = torch.randn(1, 3, 32, 32)
        ours = create_cam_method(self.name, model)(x, torch.tensor([2]))[0, 0].numpy()
        with backend(model=model, target_layers=[model.backbone]) as ref:
            theirs = ref(input_tensor=x, targets=[ClassifierOutputTarget(2)])[0]
        def minmax(a):
            a = a - a.min()
            return a / (a.max() + 1e-7)

        # pytorch-grad-cam: min-max, resize to the input, then min-max again after aggregating layers
        ours = minmax(cv2.resize(minmax(ours), (32, 32)))
        assert np.allclose(ours, theirs, atol=1e-4)

    def test_intermediate_target_layer(self, model):
        method = create_cam_method(self.name, model, target_layer="backbone.layer2")
        maps = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
        assert maps.shape == (2, 2, 4, 4) and torch.isfinite(maps).all()


class TestGradCAM(GradTester):
    name = "gradcam"


class TestGradCAMPlusPlus(GradTester):
    name = "gradcam++"
    scale_equivariant = False


class TestXGradCAM(GradTester):
    name = "xgradcam"


class TestLayerCAM(GradTester):
    name = "layercam"


class TestHiResCAM(GradTester):
    name = "hirescam"


def test_every_method_has_a_tester():
    testers = {c.name for c in CAMMethodTester.__subclasses__() if hasattr(c, "name")}
    testers |= {c.name for c in GradTester.__subclasses__()}
    assert set(CAM_METHODS.names()) <= testers


def test_gradcam_equals_cam_on_gap_linear_head(model):
    """With a GAP + linear head and the final features as target layer, Grad-CAM is CAM / (h*w)."""
    x = torch.randn(1, 3, 32, 32)
    c = create_cam_method("cam", model)(x, torch.tensor([1]))
    g = create_cam_method("gradcam", model)(x, torch.tensor([1]))
    assert torch.allclose(g * 16, c, atol=1e-5)


def test_tokens_to_grid_drops_prefix_tokens_row_by_row():
    from wsss.cam.methods import tokens_to_grid

    t = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # 1 class token + a 2x3 grid, 3 channels
    t0 = t.clone()
    g = tokens_to_grid(t, 2, 3)
    assert g.shape == (2, 3, 2, 3) and torch.equal(t, t0)
    assert torch.equal(g[1, :, 1, 2], t[1, 6]) and torch.equal(g[0, :, 0, 0], t[0, 1])
    with pytest.raises(ValueError, match="cannot fill"):
        tokens_to_grid(t, 3, 3)


def test_gradient_cams_on_a_vit_block_use_the_patch_grid():
    """A transformer block's tokens are laid out on the patch grid (pytorch-grad-cam's ViT convention):
    the maps of a block equal those of the classifier features when the block is the last one."""
    from wsss.models import Classifier, create_backbone

    torch.manual_seed(0)
    vit = Classifier(create_backbone("timm:vit_tiny_patch16_224"), 3).eval()
    x = torch.randn(2, 3, 40, 56)  # not whole patches: padded, grid ceil(40/16) x ceil(56/16)
    last = f"backbone.net.model.blocks.{len(vit.backbone.net.model.blocks) - 1}"
    feats = create_cam_method("gradcam", vit)(x, torch.tensor([0, 2]))
    block = create_cam_method("gradcam", vit, target_layer=last)(x, torch.tensor([0, 2]))
    assert block.shape == feats.shape == (2, 2, 3, 4)
    assert block.abs().sum() > 0 and torch.allclose(block, feats, atol=1e-6 * float(feats.abs().max()))


def test_factory_errors(model):
    with pytest.raises(ConfigError, match=r"unknown CAM method 'scorecam' \(valid: cam, gradcam"):
        create_cam_method("scorecam", model)
    with pytest.raises(ConfigError, match="not a module"):
        create_cam_method("gradcam", model, target_layer="backbone.nope")
    with pytest.raises(ConfigError, match="features only"):
        create_cam_method("cam", model, target_layer="backbone.layer2")


def _images():
    rng = np.random.default_rng(0)
    sizes = [(40, 48), (40, 48), (33, 27), (40, 48), (33, 27)]
    labels = [(1,), (2, 4), (3,), (), (1, 2, 3)]
    return [(f"i{n}", rng.integers(0, 255, (*s, 3), dtype=np.uint8), lab) for n, (s, lab) in enumerate(zip(sizes, labels))]


@pytest.mark.parametrize("name", ["cam", "gradcam"])
def test_extract_batched_equals_one_by_one(model, name):
    method = create_cam_method(name, model)
    kw = dict(mean=(0.5,) * 3, std=(0.5,) * 3, scales=(1.0, 0.5, 1.5), flip=True)
    batched = {sid: (c, m) for sid, c, m in extract_cams(method, _images(), batch_size=4, **kw)}
    single = {sid: (c, m) for sid, c, m in extract_cams(method, _images(), batch_size=1, **kw)}
    # a pixel budget of one image per pass splits every batch (and its mirror) into single passes
    split = {sid: (c, m) for sid, c, m in extract_cams(method, _images(), batch_size=4, batch_pixels=40 * 48, **kw)}
    assert batched.keys() == single.keys() == split.keys() == {f"i{n}" for n in range(5)}
    for sid, img, lab in _images():
        c, m = batched[sid]
        assert c.tolist() == sorted(lab) and m.shape == (len(lab), *img.shape[:2])
        assert np.allclose(m, single[sid][1], atol=1e-5)
        assert np.allclose(m, split[sid][1], atol=1e-5)
        if len(lab):
            assert np.allclose(m.reshape(len(lab), -1).max(1), 1.0, atol=1e-3), "max-normalised per class"


def test_extract_resize_long_returns_image_resolution(model):
    method = create_cam_method("cam", model)
    out = list(extract_cams(method, _images()[:1], mean=(0.5,) * 3, std=(0.5,) * 3, scales=(1.0,), resize_long=96))
    assert out[0][2].shape == (1, 40, 48)


def test_flip_is_undone(model):
    """An image and its mirror give mirrored maps when flip averaging is on."""
    method = create_cam_method("cam", model)
    _, img, _ = _images()[0]
    kw = dict(mean=(0.5,) * 3, std=(0.5,) * 3, scales=(1.0,), flip=True)
    (_, _, a), = extract_cams(method, [("a", img, (1,))], **kw)
    (_, _, b), = extract_cams(method, [("b", img[:, ::-1].copy(), (1,))], **kw)
    assert np.allclose(a, b[:, :, ::-1], atol=1e-5)


def test_max_normalise_keeps_zero_maps():
    m = torch.zeros(1, 2, 3, 3)
    m[0, 0, 1, 1] = 4.0
    n = max_normalise(m)
    assert n[0, 0].max() == pytest.approx(1.0, abs=1e-5) and n[0, 1].abs().sum() == 0


def test_npz_roundtrip_and_plain_numpy(tmp_path):
    cam = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    save_cam(tmp_path / "x.npz", np.array([1, 3]), cam)
    z = np.load(tmp_path / "x.npz", allow_pickle=False)
    assert z["classes"].dtype == np.int16 and z["cam"].dtype == np.float16 and z["cam"].shape == (2, 5, 7)
    classes, back = load_cam(tmp_path / "x.npz", num_classes=3)
    assert classes.tolist() == [1, 3] and np.allclose(back, cam, atol=1e-3)


@pytest.mark.parametrize("bad,msg", [
    (dict(classes=np.array([1], np.int16), cam=np.full((1, 2, 2), np.nan, np.float16)), "NaN"),
    (dict(classes=np.array([1], np.int16), cam=-np.ones((1, 2, 2), np.float16)), r"in \[0, 1\]"),
    (dict(classes=np.array([1, 2], np.int16), cam=np.ones((1, 2, 2), np.float16)), "2 classes"),
    (dict(classes=np.array([9], np.int16), cam=np.ones((1, 2, 2), np.float16)), "outside 1..3"),
    (dict(cam=np.ones((1, 2, 2), np.float16)), "not a wsss CAM file"),
])
def test_bad_cam_files(tmp_path, bad, msg):
    np.savez(tmp_path / "x.npz", **bad)
    with pytest.raises(DataError, match=msg):
        load_cam(tmp_path / "x.npz", num_classes=3)


def test_sweep_equals_naive_per_threshold_evaluation():
    rng = np.random.default_rng(0)
    items = []
    for _ in range(6):
        gt = rng.integers(0, 4, (20, 30)).astype(np.uint8)
        gt[0, :5] = 255
        cl = np.array(sorted(rng.choice([1, 2, 3], size=rng.integers(0, 3), replace=False)), dtype=np.int64)
        cam = rng.random((len(cl), 20, 30))
        cam[:, 1, 1] = 0.3  # exactly on a threshold: must count as background (strictly above)
        items.append((gt, cl, cam))
    ths = [0.1, 0.3, 0.5, 0.9]
    r = sweep_cam_thresholds(items, 4, ths)
    naive = [miou(sum(confusion(g, cams_to_mask(c, cl, t), 4) for g, cl, c in items)) for t in ths]
    assert np.allclose(r.miou, naive)
    assert r.best_threshold in ths and 0 <= r.precision[0] <= 1 and 0 <= r.recall[0] <= 1
