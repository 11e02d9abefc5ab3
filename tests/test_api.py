"""The public Python API (wsss.load_config / run / Segmenter / Classifier), as a notebook uses it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import wsss
from wsss.errors import ConfigError, WsssError

TINY = ["data.synth.n_train=16", "data.synth.n_val=6", "data.synth.size=64", "train_cls.epochs=1", "train_cls.crop_size=64",
        "cam.scales=[1.0]", "train_seg.epochs=1", "train_seg.crop_size=64", "run.gallery_images=0", "crf.workers=1"]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    cfg = wsss.load_config("configs/demo.yaml", overrides=[f"run.out_dir={out}", *TINY])
    return cfg, wsss.run(cfg)


def test_load_config_from_a_path_a_dict_or_a_config():
    a = wsss.load_config("configs/demo.yaml", overrides=["train_cls.epochs=3"])
    assert a.train_cls.epochs == 3 and a.train_cls.backbone == "tiny"
    b = wsss.load_config({"data": {"source": "synth"}, "train_cls": {"epochs": 2}}, overrides=["crf.iterations=4"])
    assert b.train_cls.epochs == 2 and b.crf.iterations == 4
    c = wsss.load_config(a, overrides=["train_cls.epochs=5"])
    assert c.train_cls.epochs == 5 and a.train_cls.epochs == 3, "the given config is not modified"
    assert wsss.load_config().run.name  # the defaults
    with pytest.raises(ConfigError, match="train_cls.epoch"):
        wsss.load_config({"train_cls": {"epoch": 2}})
    with pytest.raises(ConfigError, match="override train_cls.epochs=x"):
        wsss.load_config(None, overrides=["train_cls.epochs=x"])


def test_run_returns_the_numbers_and_caches_like_the_cli(api_run, capsys, run_cli):
    cfg, res = api_run
    m = res.report["metrics"]
    assert {"cam", "crf", "seg"} <= set(m) and 0 <= m["seg"]["mIoU"] <= 100
    again = wsss.run(cfg)
    assert all(skipped for _, _, skipped in again.done) and again.report["metrics"] == m
    assert capsys.readouterr().out == "", "the library printed"
    code, out, _ = run_cli("run", "configs/demo.yaml", f"run.out_dir={cfg.run.out_dir}", *TINY)
    assert code == 0 and f"{m['seg']['mIoU']:.1f}" in out  # the CLI prints what the API returns


def test_run_a_slice_and_bad_slices(api_run):
    cfg, _ = api_run
    res = wsss.run(cfg, stages=("cam", "expand", "crf"))
    assert [(name, skipped) for name, _, skipped in res.done] == [("cam", True), ("crf", True)] and res.disabled == ["expand"]
    assert [n for n, _, _ in wsss.run(cfg, stages="crf").done] == ["crf"]
    with pytest.raises(ConfigError, match="consecutive"):
        wsss.run(cfg, stages=["cam", "crf"])
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        wsss.run(cfg, stages="nope")
    with pytest.raises(ConfigError, match="unknown flow"):
        wsss.run(cfg, flow="weird")


def _inputs(rgb: np.ndarray):
    """The same photo as a path-free variety of inputs: uint8, float, PIL, RGBA (opaque)."""
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return [rgb, rgb.astype(np.float32) / 255.0, Image.fromarray(rgb), rgba, Image.fromarray(rgba)]


def test_segmenter_predicts_any_image_kind(api_run, tmp_path):
    cfg, _ = api_run
    seg = wsss.Segmenter.load(cfg.run.out_dir / "seg" / "segmenter.pt")
    assert seg.classes[0] == "background"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rgb).save(path)
    before = rgb.copy()
    ref = seg.predict(path)
    assert ref.shape == (40, 52) and ref.dtype == np.uint8 and ref.max() < len(seg.classes)
    for im in _inputs(rgb):
        assert np.array_equal(seg.predict(im), ref), type(im)
    assert np.array_equal(rgb, before), "the input array was modified"
    probs = seg.predict_proba(rgb)
    assert probs.shape == (len(seg.classes), 40, 52) and np.allclose(probs.sum(0), 1, atol=1e-4)
    gray = seg.predict(rgb[..., 0])
    assert gray.shape == (40, 52)


def test_segmenter_batches_on_request(api_run):
    cfg, _ = api_run
    seg = wsss.Segmenter.load(cfg.run.out_dir / "seg" / "segmenter.pt")
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(32, 32, 3), (40, 24, 3), (32, 32, 3)]]
    batch = seg.predict_proba(ims, batch_size=2)
    assert isinstance(batch, list) and [p.shape[1:] for p in batch] == [(32, 32), (40, 24), (32, 32)]
    for im, p in zip(ims, batch):
        assert np.allclose(seg.predict_proba(im), p, atol=1e-5)
    masks = seg.predict(ims, crf=True)
    assert [m.shape for m in masks] == [(32, 32), (40, 24), (32, 32)]


def test_segmenter_excludes_classes_that_never_share_a_training_photo(api_run):
    cfg, _ = api_run
    seg = wsss.Segmenter.load(cfg.run.out_dir / "seg" / "segmenter.pt")
    k = len(seg.classes)
    probs = np.full((k, 8, 8), 0.1, np.float32)
    probs[0], probs[1, :5], probs[2, 6:] = 0.5, 0.9, 0.9  # class 1 wins 40 pixels, class 2 16
    seg.predict_proba = lambda image, **kw: [probs.copy() for _ in image] if isinstance(image, list) else probs.copy()
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert set(np.unique(seg.predict(rgb))) == {0, 1, 2}
    assert set(np.unique(seg.predict(rgb, exclusive_below=0.05))) == {0, 1, 2}  # the toy set's classes share photos
    seg.meta["cooccurrence"] = np.diag(np.diag(seg.meta["cooccurrence"])).tolist()  # now they never do
    assert [set(np.unique(m)) for m in seg.predict([rgb, rgb], exclusive_below=0.05)] == [{0, 1}] * 2
    del seg.meta["cooccurrence"]
    with pytest.raises(WsssError, match="lacks"):
        seg.predict(rgb, exclusive_below=0.05)


@pytest.mark.parametrize("bad,msg", [(np.zeros((4, 4, 2), np.uint8), "must be"), (np.full((4, 4, 3), 2.0, np.float32), r"\[0, 1\]"),
                                     (np.zeros((4, 4, 3), np.int32), "uint8"), ("missing.jpg", "not found")])
def test_bad_images_are_refused_in_one_line(api_run, bad, msg):
    cfg, _ = api_run
    seg = wsss.Segmenter.load(cfg.run.out_dir / "seg" / "segmenter.pt")
    with pytest.raises(Exception, match=msg) as e:
        seg.predict(bad)
    assert "\n" not in str(e.value)


def test_classifier_cams_and_scores(api_run):
    cfg, _ = api_run
    clf = wsss.Classifier.load(cfg.run.out_dir / "cls" / "classifier.pt")
    names = clf.classes[1:]
    rgb = np.random.default_rng(2).integers(0, 255, (48, 36, 3), dtype=np.uint8)
    cams = clf.cams(rgb)
    assert list(cams) == names and all(m.shape == (48, 36) and m.dtype == np.float32 for m in cams.values())
    assert all(0 <= m.min() and m.max() <= 1 for m in cams.values())
    one = clf.cams(Image.fromarray(rgb), classes=[names[1]])
    assert list(one) == [names[1]] and np.allclose(one[names[1]], cams[names[1]], atol=1e-6)
    assert list(clf.cams(rgb, classes=[1])) == [names[0]]
    grad = clf.cams(rgb, classes=[names[0]], method="gradcam")
    assert grad[names[0]].shape == (48, 36)
    with pytest.raises(ValueError, match="unknown class 'zebra'"):
        clf.cams(rgb, classes=["zebra"])
    with pytest.raises(ValueError, match="0 is background"):
        clf.cams(rgb, classes=[0])
    scores = clf.scores(rgb)
    assert list(scores) == names and all(0 <= v <= 1 for v in scores.values())
