"""Segmenters (one tester per registered model), the loss, the training dataset, training with exact
resume, and prediction (multi-scale + flip, odd sizes, batching, CRF, overlays, resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.config import PredictConfig, TrainSegConfig, config_hash, load_config
from wsss.data.dataset import load_voc
from wsss.errors import ConfigError, DataError, WsssError
from wsss.io import read_image, read_mask, write_palette_png
from wsss.models.segmenter import SEGMENTERS, create_segmenter
from wsss.data.presets import train_transform
from wsss.engine.core import autocast
from wsss.engine.segmenter import SegDataset, seg_loss, train_segmenter
from wsss.inference import (
    exclusive_classes,
    input_items,
    label_maps,
    max_merge,
    overlay,
    predict_items,
    predict_probs,
    stored_cooccurrence,
    write_label_maps,
)
from wsss.models.checkpoint import load_segmenter, save_checkpoint

from tests.conftest import make_voc

K = 3


class SegmenterTester:
    """Base tester: subclasses name a registered segmenter and the options that keep it small."""

    name: str = ""
    options: dict = {}

    def make(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return create_segmenter(self.name, K, **self.options)

    def test_forward_shape_on_odd_size_and_input_untouched(self):
        model = self.make().eval()
        x = torch.randn(2, 3, 37, 45)
        before = x.clone()
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, K, 37, 45)
        assert torch.isfinite(y).all()
        assert torch.equal(x, before)

    def test_backward_reaches_backbone_and_head(self):
        model = self.make().train()
        x = torch.randn(2, 3, 48, 40)
        target = torch.randint(0, K, (2, 48, 40))
        seg_loss(model(x), target).backward()
        groups = model.param_groups(0.01, 10.0)
        for g in groups:
            assert g["params"], "empty parameter group"
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g["params"])
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "a parameter is in two groups"

    def test_save_load_round_trip(self, tmp_path):
        model = self.make().eval()
        meta = {"arch": self.name, "spec": model.spec(), "num_classes": K, "classes": ["background", "a", "b"],
                "mean": list(model.mean), "std": list(model.std), "resize_long": None, "masks": "pseudo"}
        save_checkpoint(tmp_path / "segmenter.pt", {"model": model.state_dict(), "meta": meta})
        again, meta2 = load_segmenter(tmp_path / "segmenter.pt")
        x = torch.randn(1, 3, 40, 40)
        with torch.no_grad():
            assert torch.allclose(model(x), again(x), atol=1e-6)
        assert meta2["arch"] == self.name


class TestDeepLabV3(SegmenterTester):
    name, options = "deeplabv3", {"backbone": "tiny", "channels": 32}


class TestDeepLabV3Plus(SegmenterTester):
    name, options = "deeplabv3plus", {"backbone": "tiny", "channels": 32}


class TestDeepLabV3PlusLite0(SegmenterTester):
    name, options = "deeplabv3plus", {"backbone": "efficientnet_lite0", "channels": 32}


def test_deeplabv3plus_decodes_at_the_low_level_stride():
    model = create_segmenter("deeplabv3plus", K, backbone="tiny", channels=16).eval()
    x = torch.randn(1, 3, 64, 48)
    x0 = x.clone()
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    assert logits.shape[-2:] == feats[0].shape[-2:] == (16, 12) and torch.equal(x, x0)  # stride 4, not the backbone's 8


class TestFCN(SegmenterTester):
    name, options = "fcn", {"backbone": "tiny"}


class TestFCNSkip(SegmenterTester):
    name, options = "fcn_skip", {"backbone": "tiny", "output_stride": 16}


class TestFCNSkipTimmResNet(SegmenterTester):
    name, options = "fcn_skip", {"backbone": "timm:resnet18", "output_stride": 32}


class TestUNet(SegmenterTester):
    name, options = "unet", {"backbone": "tiny"}


class TestUNetLite0(SegmenterTester):
    name, options = "unet", {"backbone": "efficientnet_lite0", "decoder_channels": [32, 16, 16]}


class TestUNetTimmViT(SegmenterTester):
    name, options = "unet", {"backbone": "timm:vit_tiny_patch16_224", "decoder_channels": [32, 16, 16]}


class TestHRNet(SegmenterTester):
    name, options = "hrnet", {"backbone": "tiny", "channels": 32}


class TestHRNetTimm(SegmenterTester):
    name, options = "hrnet", {"backbone": "timm:hrnet_w18_small_v2", "channels": 32}


def test_fcn_skip_fuses_one_score_per_stride_and_upsamples_by_learning():
    model = create_segmenter("fcn_skip", K, backbone="resnet18", output_stride=32).eval()
    assert model.picks == [1, 2, 3]  # strides 8, 16, 32 (FCN-8s)
    assert [u.factor for u in model.fuse_up] == [2, 2] and model.final_up.factor == 8
    plain = create_segmenter("fcn", K, backbone="resnet18", output_stride=32)
    assert plain.picks == [3] and plain.final_up.factor == 32  # FCN-32s
    # the learned upsampling starts as bilinear interpolation: a constant map stays constant inside
    y = model.final_up(torch.ones(1, K, 4, 4), (32, 32))
    assert y.shape == (1, K, 32, 32) and torch.allclose(y[..., 8:24, 8:24], torch.ones(1, K, 16, 16))


def test_unet_decodes_to_the_input_resolution():
    model = create_segmenter("unet", K, backbone="tiny").eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        logits = model.forward_head(model.forward_features(x))
    assert logits.shape[-2:] == (64, 48)


def test_unet_takes_one_decoder_width_per_level():
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="needs 3 values"):
        create_segmenter("unet", K, backbone="tiny", decoder_channels=[8, 8])


class TestDeepLabV2(SegmenterTester):
    name, options = "deeplabv2", {"backbone": "tiny"}


class TestDeepLabV2LargeFOV(SegmenterTester):
    name, options = "deeplabv2_largefov", {"backbone": "tiny", "channels": 64}


class TestDeepLabV3Lite0(SegmenterTester):
    name, options = "deeplabv3", {"backbone": "efficientnet_lite0", "channels": 32}


class TestTorchvisionResNet50(SegmenterTester):
    name, options = "tv_deeplabv3_resnet50", {}


class TestTorchvisionResNet101(SegmenterTester):
    name, options = "tv_deeplabv3_resnet101", {}


class TestTorchvisionMobileNet(SegmenterTester):
    name, options = "tv_deeplabv3_mobilenet_v3_large", {}


def test_every_registered_segmenter_has_a_tester():
    tested = {c.name for c in SegmenterTester.__subclasses__()}
    assert set(SEGMENTERS.names()) <= tested


def test_unknown_segmenter_lists_valid_names():
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="valid: deeplabv2, deeplabv2_largefov, deeplabv3, deeplabv3plus, fcn, fcn_skip, hrnet"):
        create_segmenter("deeplabv4", 3)
    with pytest.raises(ConfigError, match="no option"):
        create_segmenter("tv_deeplabv3_resnet50", 3, channels=12)


def test_v3_rates_follow_output_stride():
    assert create_segmenter("deeplabv3", 3, backbone="tiny", output_stride=8, channels=8).rates == [12, 24, 36]
    assert create_segmenter("deeplabv3", 3, backbone="tiny", output_stride=16, channels=8).rates == [6, 12, 18]
    assert create_segmenter("deeplabv2", 3, backbone="tiny", output_stride=8).rates == [6, 12, 18, 24]


# -------------------------------------------------------------------------------------------------- loss


def test_all_ignored_mask_gives_zero_loss_and_gradient():
    logits = torch.randn(2, K, 8, 8, requires_grad=True)
    loss = seg_loss(logits, torch.full((2, 8, 8), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_loss_drop_leaves_out_each_class_s_largest_losses():
    """Loss truncation: with drop 1/3 the third of each class's pixels the network fits worst (here: an
    object's label spread one row too far, onto pixels the network calls background) gets no gradient,
    and the loss is the mean over the rest."""
    fit = torch.zeros(1, 8, 8, dtype=torch.long)
    fit[:, 6:] = 1
    logits = (torch.nn.functional.one_hot(fit, K).permute(0, 3, 1, 2).float() * 4).requires_grad_(True)
    noisy = fit.clone()
    noisy[:, 5] = 1  # 8 of the 24 "class 1" labels are wrong
    before = noisy.clone()
    loss = seg_loss(logits, noisy, drop=1 / 3)
    assert torch.equal(noisy, before)
    right = torch.nn.functional.cross_entropy(logits.detach(), fit, reduction="none")[0, 0, 0]
    assert torch.allclose(loss, right)  # 16 right class-1 pixels and 26 of 40 (right) background ones
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, :, 5]) == 0 and torch.count_nonzero(logits.grad[:, :, 6:]) > 0
    assert torch.allclose(seg_loss(logits, noisy, drop=0.0), seg_loss(logits, noisy))
    assert seg_loss(logits, torch.full((1, 8, 8), 255), drop=0.5).item() == 0.0


def test_loss_drop_keeps_a_hard_class():
    """A class the network does not fit yet (all its losses above every other pixel's) keeps 1 - drop of
    its pixels: truncating over the whole batch would leave all of them out."""
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[:, :2] = 1  # 20% of the pixels
    logits = torch.zeros(1, K, 10, 10)
    logits[:, 0] = 2.0  # background everywhere: class 1's losses are the largest
    logits.requires_grad_(True)
    seg_loss(logits, target, drop=0.3).backward()
    moved = (logits.grad[0, 1, :2] != 0).sum().item()
    assert moved == int(20 * 0.7)
    assert torch.isfinite(logits.grad).all()


def test_ignored_pixels_do_not_count():
    torch.manual_seed(0)
    logits = torch.randn(1, K, 4, 4)
    target = torch.randint(0, K, (1, 4, 4))
    target[0, :2] = 255
    other = logits.clone()
    other[0, :, :2] = torch.randn(K, 2, 4) * 10  # change only ignored pixels
    assert torch.allclose(seg_loss(logits, target), seg_loss(other, target))
    kept = torch.nn.functional.cross_entropy(logits[0, :, 2:].reshape(K, -1).T, target[0, 2:].reshape(-1))
    assert torch.allclose(seg_loss(logits, target), kept)


# -------------------------------------------------------------------------------------------------- data


def _mask_dir(tmp_path: Path, ds, value=None) -> Path:
    out = tmp_path / "masks"
    for i, s in enumerate(ds):
        m = ds.read_mask(i) if value is None else np.full(ds.read_mask(i).shape, value, np.uint8)
        write_palette_png(out / f"{s.id}.png", m)
    return out


def test_seg_dataset_pads_mask_with_ignore_and_checks_ids(voc, tmp_path):
    from wsss.engine.segmenter import pseudo_mask_source

    ds = load_voc(voc, "train")
    cfg = TrainSegConfig(crop_size=80, scale_range=(1.0, 1.0), hflip=False)
    data = SegDataset(ds, pseudo_mask_source(ds, _mask_dir(tmp_path, ds)), train_transform(cfg, (0, 0, 0)),
                      (0.5,) * 3, (0.5,) * 3)
    x, y = data[0]  # 40x50 image in an 80x80 crop: the padding is ignored
    assert x.shape == (3, 80, 80) and y.shape == (80, 80)
    assert (y == 255).sum() == 80 * 80 - 40 * 50
    bad = SegDataset(ds, pseudo_mask_source(ds, _mask_dir(tmp_path / "bad", ds, value=7)), train_transform(cfg, (0, 0, 0)),
                     (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="class id 7 outside 0..2"):
        bad[0]


def test_missing_pseudo_masks_are_reported(voc, tmp_path):
    from wsss.engine.segmenter import pseudo_mask_source

    ds = load_voc(voc, "train")
    folder = _mask_dir(tmp_path, ds)
    (folder / "b.png").unlink()
    with pytest.raises(DataError, match="1 of 3 training images have no pseudo-mask .first: b.png"):
        pseudo_mask_source(ds, folder)


# -------------------------------------------------------------------------------------------------- training


def _tiny_cfg(**kw) -> TrainSegConfig:
    base = dict(backbone="tiny", output_stride=8, channels=16, epochs=2, batch_size=2, optimizer="adamw", lr=0.003,
                head_lr_mult=1.0, crop_size=48, scale_range=(0.8, 1.2), head_dropout=0.5)
    return TrainSegConfig(**(base | kw))


@pytest.fixture
def small_voc(tmp_path):
    items = {f"i{n}": ("cat" if n % 2 else "dog", (48 + 4 * (n % 3), 56)) for n in range(8)}
    return make_voc(tmp_path / "small", items)


def test_resume_after_a_crash_gives_the_same_weights(small_voc, tmp_path):
    ds = load_voc(small_voc, "train")
    train_segmenter(_tiny_cfg(), ds, ds.read_mask, tmp_path / "straight")
    calls = []

    def crashing(i):  # fails while reading the second epoch's data
        calls.append(i)
        if len(calls) > len(ds) + 3:
            raise RuntimeError("simulated crash")
        return ds.read_mask(i)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_segmenter(_tiny_cfg(), ds, crashing, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "segmenter.pt").exists()
    train_segmenter(_tiny_cfg(), ds, ds.read_mask, tmp_path / "resumed", resume=True)
    a = torch.load(tmp_path / "straight" / "segmenter.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "segmenter.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + one row per epoch, the first kept from before the resume


def test_resume_refuses_a_changed_recipe(small_voc, tmp_path):
    ds = load_voc(small_voc, "train")
    train_segmenter(_tiny_cfg(epochs=1), ds, ds.read_mask, tmp_path / "r")
    with pytest.raises(WsssError, match="train_seg.lr differ"):
        train_segmenter(_tiny_cfg(epochs=2, lr=0.1), ds, ds.read_mask, tmp_path / "r")


def test_training_lowers_the_loss_and_scores_val(small_voc, tmp_path):
    ds = load_voc(small_voc, "train")
    res = train_segmenter(_tiny_cfg(epochs=6, head_dropout=0.0), ds, ds.read_mask, tmp_path / "t", val_ds=ds)
    losses = [r["loss"] for r in res["history"]]
    assert losses[-1] < losses[0]
    assert all("val_mIoU" in r for r in res["history"])
    _, meta = load_segmenter(tmp_path / "t" / "segmenter.pt")  # the labels' co-occurrence, for predict.exclusive_below
    assert meta["cooccurrence"] == ds.cooccurrence().tolist() == [[4, 0], [0, 4]]


def test_training_in_bf16_on_cpu_lowers_the_loss_and_keeps_float32_weights(small_voc, tmp_path):
    ds = load_voc(small_voc, "train")
    res = train_segmenter(_tiny_cfg(epochs=6, head_dropout=0.0, amp="bf16"), ds, ds.read_mask, tmp_path / "t", val_ds=ds)
    losses = [r["loss"] for r in res["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    weights = torch.load(tmp_path / "t" / "segmenter.pt", weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())


def test_autocast_is_bf16_on_cpu_and_fp16_only_on_cuda():
    conv, x, cpu = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert conv(x).dtype == torch.bfloat16
    for amp in ("none", "fp16"):
        with autocast(cpu, amp):
            assert conv(x).dtype == torch.float32


# -------------------------------------------------------------------------------------------------- predict


def _model():
    torch.manual_seed(0)
    return create_segmenter("deeplabv3", K, backbone="tiny", channels=16).eval()


def test_predict_probs_odd_sizes_scales_and_flip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    before = img.copy()
    p = predict_probs(_model(), [img], scales=[0.5, 1.0, 1.5], flip=True, resize_long=70)
    assert p.shape == (1, K, 37, 53) and p.dtype == np.float32
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    assert np.array_equal(img, before)
    # flip averaging makes the prediction of the mirrored photo the mirror of the prediction
    q = predict_probs(_model(), [img[:, ::-1].copy()], scales=[0.5, 1.0, 1.5], flip=True, resize_long=70)
    assert np.allclose(q[0], p[0][:, :, ::-1], atol=1e-5)


def test_predict_probs_in_bf16_stay_float32_and_close_to_float32():
    img = np.random.default_rng(2).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    full = predict_probs(_model(), [img], scales=[1.0, 0.5], resize_long=70)
    half = predict_probs(_model(), [img], scales=[1.0, 0.5], resize_long=70, amp="bf16")
    assert half.dtype == np.float32 and np.allclose(half.sum(1), 1.0, atol=1e-5)
    assert not np.array_equal(half, full)  # bf16 really ran
    assert np.abs(half - full).max() < 0.05


def test_predict_batch_equals_one_by_one():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (41, 29, 3), dtype=np.uint8) for _ in range(3)]
    both = predict_probs(_model(), imgs, scales=[1.0, 0.75])
    single = np.concatenate([predict_probs(_model(), [im], scales=[1.0, 0.75]) for im in imgs])
    assert np.allclose(both, single, atol=1e-5)
    with pytest.raises(ValueError, match="share their size"):
        predict_probs(_model(), [imgs[0], imgs[0][:20]])


def test_predict_items_writes_masks_overlays_and_resumes(voc, tmp_path):
    items = input_items([voc / "JPEGImages"])
    assert [sid for sid, _ in items] == ["a", "b", "c"]
    cfg = PredictConfig(scales=[1.0], batch_size=2)
    out = tmp_path / "pred"
    res = predict_items(_model(), items, out, cfg, resize_long=None)
    assert res["computed"] == 3
    for sid, path in items:
        m = read_mask(out / f"{sid}.png")
        assert m.max() < K and (out / "overlay" / f"{sid}.jpg").is_file()
    (out / "b.png").unlink()
    assert predict_items(_model(), items, out, cfg, resize_long=None)["computed"] == 1
    # CRF post-processing runs and keeps the size
    res = predict_items(_model(), items[:1], tmp_path / "crf", cfg, resize_long=None, crf_cfg=load_config(None).crf)
    assert read_mask(tmp_path / "crf" / "a.png").shape == (40, 50)


def test_label_maps_renormalise_over_background_and_the_labels():
    rng = np.random.default_rng(2)
    p = rng.random((4, 5, 6)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    before = p.copy()
    m = label_maps(p, [3, 1])
    assert m.shape == (2, 5, 6) and m.dtype == np.float32 and np.array_equal(p, before)
    keep = p[0] + p[1] + p[3]  # background and the two labels; class 2 is ruled out by the tags
    assert np.allclose(m[0], p[3] / keep, atol=1e-6) and np.allclose(m[1], p[1] / keep, atol=1e-6)
    assert (m.sum(0) <= 1 + 1e-6).all() and m.min() >= 0
    assert label_maps(p, []).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="outside 1..3"):
        label_maps(p, [4])
    with pytest.raises(ValueError, match="outside"):
        label_maps(p, [0])


def test_write_label_maps_writes_the_cam_format_and_resumes(voc, tmp_path):
    from wsss.camfile import load_cam

    ds = load_voc(voc, "train")
    items = [(s.id, s.image, s.labels) for s in ds]
    out = tmp_path / "maps"
    assert write_label_maps(_model(), items, out, [1.0, 0.5], True, None, torch.device("cpu"), batch_size=2) == 3
    for s in ds:
        classes, cam = load_cam(out / f"{s.id}.npz", num_classes=K - 1)
        img_h, img_w = read_mask(voc / "SegmentationClass" / f"{s.id}.png").shape
        assert classes.tolist() == list(s.labels) and cam.shape == (len(s.labels), img_h, img_w)
    p = predict_probs(_model(), [read_image(ds[1].image)], [1.0, 0.5])[0]
    _, cam = load_cam(out / "b.npz")
    assert np.abs(cam - label_maps(p, ds[1].labels)).max() < 2e-3  # fp16 on disk
    (out / "c.npz").unlink()
    assert write_label_maps(_model(), items, out, [1.0], True, None, torch.device("cpu")) == 1


def test_max_merge_matches_classes_by_id_and_leaves_its_inputs():
    rng = np.random.default_rng(4)
    maps, other = rng.random((2, 3, 4)).astype(np.float32), rng.random((3, 3, 4)).astype(np.float32)
    before = maps.copy(), other.copy()
    m = max_merge([5, 2], maps, [2, 7, 5], other)
    assert np.array_equal(maps, before[0]) and np.array_equal(other, before[1])
    assert np.array_equal(m[0], np.maximum(maps[0], other[2])) and np.array_equal(m[1], np.maximum(maps[1], other[0]))
    m = max_merge([5, 3], maps, [5], other[:1])
    assert np.array_equal(m[1], maps[1]), "a class the other maps lack keeps its own map"
    with pytest.raises(ValueError, match="cannot be merged"):
        max_merge([5, 2], maps, [5], other[:1, :2])


def test_write_label_maps_merges_the_cams(voc, tmp_path):
    from wsss.camfile import load_cam, save_cam

    ds = load_voc(voc, "train")
    items = [(s.id, s.image, s.labels) for s in ds]
    cams = tmp_path / "cams"
    for s in ds:
        h, w = read_mask(voc / "SegmentationClass" / f"{s.id}.png").shape
        cam = np.zeros((len(s.labels), h, w), np.float32)
        cam[:, : h // 2] = 1.0  # the top half certain: the merged maps must be 1 there, the segmenter's below
        save_cam(cams / f"{s.id}.npz", np.array(s.labels), cam)
    write_label_maps(_model(), items, tmp_path / "plain", [1.0], False, None, torch.device("cpu"))
    write_label_maps(_model(), items, tmp_path / "merged", [1.0], False, None, torch.device("cpu"), merge_dir=cams)
    for s in ds:
        _, plain = load_cam(tmp_path / "plain" / f"{s.id}.npz")
        classes, merged = load_cam(tmp_path / "merged" / f"{s.id}.npz")
        h = merged.shape[1]
        assert classes.tolist() == list(s.labels)
        assert (merged[:, : h // 2] == 1).all() and np.array_equal(merged[:, h // 2:], plain[:, h // 2:])
    with pytest.raises(DataError, match="CAM file not found"):
        write_label_maps(_model(), items, tmp_path / "none", [1.0], False, None, torch.device("cpu"), merge_dir=tmp_path / "no")
    save_cam(cams / f"{ds[0].id}.npz", np.array(ds[0].labels), np.zeros((len(ds[0].labels), 3, 3), np.float32))
    with pytest.raises(DataError, match="CAM size 3x3 differs from its image's"):
        write_label_maps(_model(), items, tmp_path / "bad", [1.0], False, None, torch.device("cpu"), merge_dir=cams)


def test_seg_maps_keys_ignore_only_what_they_do_not_read(tmp_path):
    """The segmenter is reused across runs that differ only in inference settings or CRF thresholds, the
    maps only across thresholds; its epochs, the train_seg recipe, the seed or the crf masks retrain it.
    Where the final segmenter's masks come from (train_seg.mask_dir) does not."""
    from types import SimpleNamespace

    from wsss.stages.seg_maps import _keys, section

    def keys(*over, crf_key="c1"):
        cfg = load_config(None, ["segmaps.enabled=true", *over])
        ctx = SimpleNamespace(cfg=cfg, run_dir=tmp_path, manifest_key=lambda name, hint: {"crf": crf_key}.get(name, name))
        return _keys(ctx)

    seg, maps = keys()
    assert keys("segmaps.fg_threshold=0.5", "segmaps.low_threshold=0.2") == (seg, maps) == keys("segmaps.device=cpu")
    assert keys(f"train_seg.mask_dir={tmp_path}") == keys("train_seg.epochs=12") == keys("train_seg.eval_every=3") == (seg, maps)
    for maps_only in ("segmaps.scales=[1.0]", "segmaps.flip=false", "segmaps.resize_long=400", "segmaps.merge_cams=true"):
        s, m = keys(maps_only)
        assert s == seg and m != maps, maps_only
    for other in (keys("segmaps.epochs=2"), keys("train_seg.lr=0.01"), keys("train_seg.arch=deeplabv3plus"), keys("run.seed=1"),
                  keys(crf_key="c2"), keys("train_seg.crop_size=320"), keys("segmaps.crop_size=200"),
                  keys("segmaps.train_resize_long=400")):
        assert other[0] != seg and other[1] != maps
    # its own training sizes pin the segmenter whatever the final segmenter's are; naming the default is no change
    assert keys("segmaps.crop_size=256") == (seg, maps) == keys("train_seg.crop_size=320", "segmaps.crop_size=256")
    assert keys("train_seg.resize_long=500", "segmaps.train_resize_long=400") == keys("segmaps.train_resize_long=400")
    stage_key = lambda *over: config_hash(section(load_config(None, ["segmaps.enabled=true", *over])))
    assert stage_key("segmaps.crop_size=256", "segmaps.device=cpu") == stage_key() != stage_key("segmaps.crop_size=200")


def test_seg_maps_segmenter_settings_take_its_own_sizes():
    cfg = load_config(None, ["train_seg.crop_size=320", "train_seg.resize_long=400", "train_seg.epochs=6"])
    same = cfg.segmaps.segmenter_settings(cfg.train_seg)
    assert (same.crop_size, same.resize_long, same.epochs) == (320, 400, cfg.segmaps.epochs)
    cfg = load_config(None, ["train_seg.crop_size=320", "train_seg.resize_long=400", "segmaps.crop_size=256",
                             "segmaps.train_resize_long=320"])
    own = cfg.segmaps.segmenter_settings(cfg.train_seg)
    assert (own.crop_size, own.resize_long) == (256, 320)
    assert (cfg.train_seg.crop_size, cfg.train_seg.resize_long) == (320, 400)  # the final segmenter's untouched
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(None, ["segmaps.crop_size=8"])


def test_input_items_errors(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        input_items([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        input_items([tmp_path / "empty"])


def test_overlay_colours_only_foreground():
    img = np.full((2, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    out = overlay(img, mask)
    assert (out[0, 0] == 100).all() and (out[1, 0] == 100).all()
    assert not (out[0, 1] == 100).all() and not (out[1, 1] == 100).all()


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_train_seg_gt_predict_folder_and_eval(small_voc, tmp_path, run_cli):
    run = tmp_path / "run"
    args = ["data.source=voc", f"data.root={small_voc}", "data.val_split=train", f"run.out_dir={run}",
            "train_seg.backbone=tiny", "train_seg.channels=16", "train_seg.epochs=1", "train_seg.batch_size=4",
            "train_seg.crop_size=48", "predict.split=train", "predict.scales=[1.0]"]
    args = ["configs/demo.yaml", *args]
    code, out, err = run_cli("train-seg", "--masks", "gt", *args)
    assert code == 0, err
    assert "trained on gt masks" in out and (run / "seg_gt" / "segmenter.pt").is_file()
    code, out, _ = run_cli("train-seg", "--masks", "gt", *args)
    assert code == 0 and "up to date" in out
    code, out, err = run_cli("predict", "--masks", "gt", *args)
    assert code == 0, err
    assert len(list((run / "predict_gt" / "train").glob("*.png"))) == 8  # the ground-truth segmenter's folder
    code, out, err = run_cli("eval", "seg", *args, "train_seg.masks=gt")
    assert code == 0, err
    summary = json.loads((run / "predict_gt" / "train" / "eval" / "summary.json").read_text())
    assert summary["images"] == 8 and 0 <= summary["mIoU"] <= 100
    assert "recall by object size" in out and set(summary["errors"]["recall"]) == set(summary["per_class_iou"])
    code, out, err = run_cli("predict", "--model", run / "seg_gt" / "segmenter.pt", "--input", small_voc / "JPEGImages" / "i1.jpg",
                             "--out", tmp_path / "one")
    assert code == 0, err
    assert (tmp_path / "one" / "i1.png").is_file()


def test_cli_train_seg_without_pseudo_masks_says_what_to_run(small_voc, tmp_path, run_cli):
    code, _, err = run_cli("train-seg", "configs/demo.yaml", "data.source=voc", f"data.root={small_voc}", "data.val_split=train",
                           f"run.out_dir={tmp_path / 'r'}")
    assert code != 0 and "no finished crf stage" in err and "wsss crf CONFIG" in err


def test_torchvision_backbone_weights_offline_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(WsssError, match="not cached at .*mobilenet_v3_large.*copy"):
        create_segmenter("tv_deeplabv3_mobilenet_v3_large", 3, pretrained=True)
    with pytest.raises(WsssError, match="not found"):
        create_segmenter("tv_deeplabv3_resnet50", 3, pretrained=str(tmp_path / "missing.pth"))


def test_torchvision_backbone_loads_a_local_imagenet_file(tmp_path):
    """A torchvision ImageNet state dict (here: random weights of the classification model) loads into
    the segmenter's backbone strictly (every backbone tensor is taken from the file)."""
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(0)
    sd = mobilenet_v3_large().state_dict()
    torch.save(sd, tmp_path / "mnv3.pth")
    net = create_segmenter("tv_deeplabv3_mobilenet_v3_large", 3, pretrained=str(tmp_path / "mnv3.pth"))
    got = net.backbone.state_dict()
    assert got and all(torch.equal(v, sd[f"features.{k}"]) for k, v in got.items())


def test_bad_segmenter_files_give_one_line_errors(tmp_path, run_cli):
    model = create_segmenter("deeplabv3", K, backbone="tiny", channels=16)
    meta = {"arch": "deeplabv3", "spec": model.spec(), "num_classes": K, "classes": ["background", "a", "b"],
            "mean": list(model.mean), "std": list(model.std), "resize_long": None, "masks": "pseudo"}
    save_checkpoint(tmp_path / "ok.pt", {"model": model.state_dict(), "meta": meta})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WsssError, match="cannot load checkpoint"):
        load_segmenter(tmp_path / "truncated.pt")
    save_checkpoint(tmp_path / "cls.pt", {"model": model.state_dict(), "meta": {"backbone": "tiny"}})
    with pytest.raises(WsssError, match="not a wsss segmenter file"):
        load_segmenter(tmp_path / "cls.pt")
    other = meta | {"spec": {"backbone": "tiny", "output_stride": 16, "channels": 32}}
    save_checkpoint(tmp_path / "other.pt", {"model": model.state_dict(), "meta": other})
    with pytest.raises(WsssError, match="weights do not fit segmenter 'deeplabv3'"):
        load_segmenter(tmp_path / "other.pt")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    code, _, err = run_cli("predict", "--model", tmp_path / "ok.pt", "--input", tmp_path / "broken.jpg", "--out", tmp_path / "o")
    # an unreadable photo is skipped with one warning line, and the command ends with one error line listing it
    assert code == 1 and "broken.jpg" in err and err.count("\n") == 2 and err.splitlines()[-1].startswith("wsss: error:")


def _two_region_probs() -> np.ndarray:
    """(4, 6, 8) probabilities: class 1 wins the left 4 columns' top rows, class 2 a smaller patch, class 3 no pixel."""
    p = np.full((4, 6, 8), 0.1, np.float32)
    p[0] = 0.7
    p[1, :4, :4] = 0.8  # 16 pixels
    p[2, 4:, 5:] = 0.8  # 6 pixels
    return p / p.sum(0, keepdims=True)


def test_cooccurrence_counts_photos_tagged_with_both(voc):
    ds = load_voc(voc, "train")
    m = ds.label_matrix() > 0
    c = ds.cooccurrence()
    assert c.shape == (ds.num_classes, ds.num_classes) and c.dtype == np.int64
    for a in range(ds.num_classes):
        for b in range(ds.num_classes):
            assert c[a, b] == int((m[:, a] & m[:, b]).sum())


def test_exclusive_classes_keep_the_larger_of_two_classes_that_seldom_meet():
    p = _two_region_probs()
    before = p.copy()
    # 100 photos of class 1, 40 of class 2, 2 of them together: 5% of the rarer class's photos
    counts = np.array([[100, 2, 0], [2, 40, 0], [0, 0, 0]])
    assert exclusive_classes(p, counts, 0.1) == [1]  # class 2 wins fewer pixels and meets class 1 too seldom
    assert exclusive_classes(p, counts, 0.05) == [1, 2]  # at the threshold: kept
    assert exclusive_classes(p, np.array([[100, 30, 0], [30, 40, 0], [0, 0, 0]]), 0.5) == [1, 2]
    assert exclusive_classes(p, np.zeros((3, 3), np.int64), 0.5) == [1, 2]  # no training photos: no evidence to exclude
    assert np.array_equal(p, before)
    p2 = p.copy()
    p2[2, 3:, :] = 0.95  # now class 2 wins 24 pixels against the 12 left to class 1, and class 1 goes
    p2 /= p2.sum(0, keepdims=True)
    assert exclusive_classes(p2, counts, 0.1) == [2]
    with pytest.raises(ValueError, match="do not fit 4 classes"):
        exclusive_classes(p, np.zeros((2, 2)), 0.1)


def test_predict_items_with_exclusion_drops_the_smaller_class_of_an_exclusive_pair(voc, tmp_path, monkeypatch):
    items = input_items([voc / "JPEGImages"])
    p = _two_region_probs()[:K]  # background, class 1 (16 px), class 2 (6 px)
    p /= p.sum(0, keepdims=True)

    def fake_probs(model, todo, *args, **kwargs):  # every photo gets the two-class probabilities above
        for sid, path in todo:
            yield sid, np.zeros((6, 8, 3), np.uint8), p

    monkeypatch.setattr("wsss.inference.iter_probs", fake_probs)
    excl = PredictConfig(scales=[1.0], overlay=False, exclusive_below=0.05)
    with pytest.raises(ValueError, match="co-occurrence"):
        predict_items(_model(), items, tmp_path / "none", excl, resize_long=None)
    runs = {"plain": (PredictConfig(scales=[1.0], overlay=False), None),
            "never": (excl, np.diag([10] * (K - 1))),  # the two classes never share a training photo
            "often": (excl, np.full((K - 1, K - 1), 10))}  # they always do: nothing is excluded
    for name, (cfg, counts) in runs.items():
        predict_items(_model(), items, tmp_path / name, cfg, resize_long=None, cooccur=counts)
    for sid, _ in items:
        plain = read_mask(tmp_path / "plain" / f"{sid}.png")
        assert set(np.unique(plain)) == {0, 1, 2}
        assert np.array_equal(read_mask(tmp_path / "often" / f"{sid}.png"), plain)
        never = read_mask(tmp_path / "never" / f"{sid}.png")
        assert set(np.unique(never)) == {0, 1} and np.array_equal(never[plain == 1], plain[plain == 1])


def test_stored_cooccurrence_needs_a_segmenter_that_recorded_it(tmp_path):
    with pytest.raises(WsssError, match="lacks .*exclusive_below: null"):
        stored_cooccurrence({"arch": "x"}, tmp_path / "segmenter.pt")
    assert stored_cooccurrence({"cooccurrence": [[3, 1], [1, 2]]}, tmp_path).tolist() == [[3, 1], [1, 2]]
