"""Stage 3: expansion methods on tiny synthetic batches, one tester per registered method, and the
stage's erasing/merging plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.camfile import load_cam, save_cam
from wsss.config import ExpandConfig, TrainClsConfig, load_config
from wsss.data.transforms import Compose, Resize
from wsss.errors import ConfigError
from wsss.expand.methods import (EXPAND_METHODS, concentration, create_expand_methods, equivariance_loss, hide_patches,
                                 map_distance, mix_batch, pixel_entropy)
from wsss.models import create_backbone
from wsss.models.classifier import ACoLClassifier
from wsss.engine.classifier import ClsDataset, classification_loss, train_classifier
from wsss.expand.rounds import erase_masks, merge_maps
from wsss.models.checkpoint import load_classifier
from tests.conftest import make_voc


def test_hide_patches_zeroes_whole_cells_and_keeps_input():
    x = torch.rand(8, 3, 30, 30) + 0.5  # strictly positive, so hidden pixels are recognisable
    x0 = x.clone()
    y = hide_patches(x, grid=3, prob=0.5, rng=np.random.default_rng(0))
    assert torch.equal(x, x0) and y.shape == x.shape and torch.isfinite(y).all()
    hidden = (y == 0).all(1)  # (B, H, W)
    for cell in [hidden[:, r * 10:(r + 1) * 10, c * 10:(c + 1) * 10] for r in range(3) for c in range(3)]:
        per_image = cell.flatten(1)
        assert (per_image.all(1) | ~per_image.any(1)).all(), "a cell is hidden entirely or not at all"
    assert torch.equal(y[~hidden.unsqueeze(1).expand_as(y)], x[~hidden.unsqueeze(1).expand_as(x)])
    assert 0.3 < hidden.float().mean() < 0.7
    assert torch.equal(hide_patches(x, 4, 0.0, np.random.default_rng(0)), x)


def test_hide_patches_covers_sizes_not_divisible_by_grid():
    y = hide_patches(torch.ones(1, 1, 7, 9), grid=4, prob=0.999999, rng=np.random.default_rng(1))
    assert (y == 0).all()


def test_mix_batch_mixes_images_and_labels_alike():
    x, lab = torch.rand(6, 3, 8, 8), torch.eye(6)[:, :4]
    x0, l0 = x.clone(), lab.clone()
    xm, ym, lam = mix_batch(x, lab, 1.0, np.random.default_rng(3))
    assert torch.equal(x, x0) and torch.equal(lab, l0)
    ref = np.random.default_rng(3)  # same draws: lam, then the partner permutation
    assert lam == pytest.approx(ref.beta(1.0, 1.0))
    perm = torch.from_numpy(ref.permutation(6))
    assert not torch.equal(perm, torch.arange(6))
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm]) and torch.allclose(ym, lam * lab + (1 - lam) * lab[perm])


def test_regularisers():
    maps = torch.randn(2, 3, 5, 5)
    assert pixel_entropy(maps) > 0 and torch.isfinite(pixel_entropy(maps))
    confident = torch.zeros(2, 3, 5, 5)
    confident[:, 0] = 50
    assert pixel_entropy(confident) < 1e-6
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    const = torch.ones(2, 4, 5, 5)
    assert concentration(const, maps, y).abs() < 1e-5, "identical features have no spread"
    spread = torch.randn(2, 4, 5, 5)
    assert concentration(spread, maps, y) > 0


def _acol(threshold=0.5):
    torch.manual_seed(0)
    return ACoLClassifier(create_backbone("tiny", output_stride=8), 3, threshold=threshold).eval()


def test_map_distance_compares_shapes_of_present_classes_only():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.random((2, 3, 4, 5)).astype(np.float32))
    a0 = a.clone()
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    assert map_distance(a, 3 * a, y) < 1e-6, "a rescaled map has the same shape"
    b = a.clone()
    b[0, 1] = 0  # class 1 is absent from image 0: its map does not count
    assert map_distance(a, b, y) < 1e-6
    b[0, 0] = 0  # a present class's map gone: the mean of its normalised map over 3 present maps of 20 px
    expect = float((a[0, 0] / a[0, 0].max()).sum()) / (3 * 20)
    assert abs(float(map_distance(a, b, y)) - expect) < 1e-5
    assert torch.equal(a, a0)


def test_equivariance_loss_trains_through_both_views():
    model = ACoLClassifier(create_backbone("tiny", output_stride=8), 3)
    x = torch.rand(2, 3, 48, 48)
    x0 = x.clone()
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    feats = model.forward_features(x)
    loss = equivariance_loss(model, x, feats, y, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.equal(x, x0)
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_acol_erases_the_region_it_claims():
    model = _acol()
    x = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    with torch.no_grad():
        feats = model.forward_features(x)
        mask = model.erase_mask(feats, labels)
        assert mask.shape == (2, 1, *feats.shape[2:]) and 0 < mask.mean() < 1
        erased = feats * (1 - mask)
        assert (erased[mask.expand_as(feats) > 0] == 0).all()
        _, logits_b = model.training_logits(feats, labels)
        expect_b = model.classifier_b(torch.nn.functional.adaptive_avg_pool2d(erased, 1)).flatten(1)
        assert torch.allclose(logits_b, expect_b, atol=1e-6)
        maps = model.class_maps(feats, torch.tensor([0, 2]))
        a = torch.nn.functional.conv2d(feats, model.classifier.weight[[0, 2]])
        b = torch.nn.functional.conv2d(feats, model.classifier_b.weight[[0, 2]])
        assert torch.equal(maps, torch.maximum(a, b))


def test_dataset_erasing_blanks_exactly_the_mask(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": ("cat", (20, 24))})
    from wsss.data.dataset import load_voc

    ds = load_voc(root, "train")
    m = np.zeros((20, 24), bool)
    m[5:10, 3:12] = True
    data = ClsDataset(ds, Compose([Resize(size=(20, 24))]), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), erase={"a": m})
    x, _ = data[0]
    plain, _ = ClsDataset(ds, Compose([Resize(size=(20, 24))]), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))[0]
    fill = (np.round(np.array([0.5, 0.4, 0.3]) * 255) / 255 - np.array([0.5, 0.4, 0.3])) / 0.2
    for c in range(3):
        assert torch.allclose(x[c][torch.from_numpy(m)], torch.tensor(fill[c], dtype=x.dtype), atol=1e-6)
    assert torch.equal(x[:, torch.from_numpy(~m)], plain[:, torch.from_numpy(~m)])
    assert not m.all() and m.sum() == 45, "the caller's mask is untouched"


def test_factory_and_config_errors():
    with pytest.raises(ConfigError, match="valid: .*hide_and_seek"):
        create_expand_methods(["nope"], ExpandConfig())
    with pytest.raises(ConfigError, match="twice"):
        create_expand_methods(["mixup", "mixup"], ExpandConfig())
    with pytest.raises(ConfigError, match="expand.methods"):
        load_config(None, ["expand.methods=[]"])
    combo = create_expand_methods(["acol", "erasing", "hide_and_seek"], ExpandConfig())
    assert combo.head == "acol" and combo.rounds == 2


def test_merge_is_max_and_respects_the_guard(tmp_path):
    root = make_voc(tmp_path / "voc", {"a": ("cat dog", (6, 5)), "b": ("dog", (6, 5))})
    from wsss.data.dataset import load_voc

    ds = load_voc(root, "train")
    rng = np.random.default_rng(0)
    maps = {}
    for d in ("base", "new"):
        for s in ds:
            m = rng.random((len(s.labels), 6, 5)).astype(np.float32)
            save_cam(tmp_path / d / f"{s.id}.npz", np.array(s.labels), m)
            maps[d, s.id] = load_cam(tmp_path / d / f"{s.id}.npz")[1]
    allow = {"a": np.array([True, False]), "b": np.array([True])}
    merge_maps(tmp_path / "base", tmp_path / "new", tmp_path / "out", ds, allow)
    _, a = load_cam(tmp_path / "out" / "a.npz")
    assert np.allclose(a[0], np.maximum(maps["base", "a"][0], maps["new", "a"][0]), atol=1e-3)
    assert np.allclose(a[1], maps["base", "a"][1], atol=1e-3), "a class the guard rejects keeps its old map"
    masks = erase_masks(tmp_path / "out", ds, 0.5)
    assert masks["b"].dtype == bool and masks["b"].shape == (6, 5)
    assert np.array_equal(masks["b"], load_cam(tmp_path / "out" / "b.npz")[1].max(0) > 0.5)


# --------------------------------------------------------------------------------------------------
# one tester per registered method: a short fine-tune from a tiny classifier on synthetic images


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from wsss.config import SynthConfig
    from wsss.data.dataset import load_voc
    from wsss.data.synth import generate

    root = generate(SynthConfig(n_train=24, n_val=8, size=64), tmp_path_factory.mktemp("syn") / "synth")
    train = load_voc(root, "train")
    cfg = TrainClsConfig(backbone="tiny", output_stride=8, epochs=1, crop_size=48, batch_size=8, optimizer="adamw", lr=1e-3, head_lr_mult=1)
    out = tmp_path_factory.mktemp("cls")
    train_classifier(cfg, train, out)
    return cfg, train, out / "classifier.pt"


class MethodTester:
    name: str

    def test_finetune_step(self, tiny_setup, tmp_path):
        cfg, train, cls_path = tiny_setup
        ecfg = ExpandConfig(methods=[self.name])
        methods = create_expand_methods([self.name], ecfg)
        head = {"head": methods.head, **methods.head_kwargs} if methods.head != "gap" else None
        erase = {s.id: np.ones((64, 64), bool) for s in train.samples[:3]} if methods.rounds else None
        summary = train_classifier(cfg, train, tmp_path, init=cls_path, head=head, hooks=methods, erase=erase)
        assert np.isfinite(summary["final"]["loss"])
        model, meta = load_classifier(tmp_path / "classifier.pt")
        assert meta["head"]["head"] == methods.head
        x = torch.rand(2, 3, 48, 48)
        x0 = x.clone()
        k = train.num_classes
        xb, yb = methods.batch(x, torch.eye(k)[:2], np.random.default_rng(0))
        assert torch.equal(x, x0), "batch hooks must not modify their input"
        assert xb.shape == x.shape and torch.isfinite(xb).all() and yb.shape == (2, k)
        loss = classification_loss(model.train(), xb, yb, methods)
        assert torch.isfinite(loss) and loss.ndim == 0
        with torch.no_grad():
            maps = model.eval().class_maps(model.forward_features(x), torch.tensor([0, 2]))
        assert maps.shape[:2] == (2, 2) and torch.isfinite(maps).all()


class TestPlain(MethodTester):
    name = "plain"


class TestErasing(MethodTester):
    name = "erasing"


class TestHideAndSeek(MethodTester):
    name = "hide_and_seek"


class TestACoL(MethodTester):
    name = "acol"


class TestMixup(MethodTester):
    name = "mixup"


class TestEquivariant(MethodTester):
    name = "equivariant"


class TestMultiDilated(MethodTester):
    name = "multi_dilated"


class TestReCAM(MethodTester):
    name = "recam"


def test_multi_dilated_maps_fuse_rate_one_and_the_mean_of_the_dilated_heads():
    from wsss.models.classifier import MultiDilatedClassifier

    torch.manual_seed(0)
    model = MultiDilatedClassifier(create_backbone("tiny", output_stride=8), 3, rates=(2, 4)).eval()
    feats = torch.rand(2, model.backbone.out_channels, 9, 11)
    f0 = feats.clone()
    cls = torch.tensor([0, 2])
    maps = model.class_maps(feats, cls)
    base = F.conv2d(feats, model.classifier.weight[cls])
    dil = [F.conv2d(feats, conv.weight[cls], padding=r, dilation=r) for conv, r in zip(model.dilated, (2, 4))]
    assert torch.allclose(maps, base + (dil[0] + dil[1]) / 2, atol=1e-6) and torch.equal(feats, f0)
    logits = model.training_logits(feats.requires_grad_(True), torch.eye(3)[:2])
    assert len(logits) == 3 and all(t.shape == (2, 3) for t in logits)
    sum(F.multilabel_soft_margin_loss(t, torch.eye(3)[:2]) for t in logits).backward()
    assert all(conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0 for conv in model.dilated)


def test_recam_loss_trains_its_head_and_the_features():
    from wsss.models.classifier import ReCAMClassifier

    torch.manual_seed(0)
    model = ReCAMClassifier(create_backbone("tiny", output_stride=8), 4)
    x = torch.rand(3, 3, 32, 32)
    x0 = x.clone()
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    loss = model.recam_loss(model.forward_features(x), y)
    assert torch.isfinite(loss) and loss > 0 and torch.equal(x, x0)
    loss.backward()
    assert model.classifier_r.weight.grad.abs().sum() > 0 and next(model.backbone.parameters()).grad.abs().sum() > 0
    none = model.recam_loss(model.forward_features(x), torch.zeros(3, 4))
    assert none.item() == 0 and torch.isfinite(none)
    opt = torch.optim.SGD(model.classifier_r.parameters(), lr=5.0)
    feats = model.forward_features(x).detach()
    first = model.recam_loss(feats, y).item()
    for _ in range(20):
        opt.zero_grad()
        model.recam_loss(feats, y).backward()
        opt.step()
    assert model.recam_loss(feats, y).item() < first


def test_two_methods_with_their_own_heads_are_refused():
    with pytest.raises(ConfigError, match="each need their own classifier head"):
        create_expand_methods(["acol", "recam"], ExpandConfig())


def test_every_method_has_a_tester():
    tested = {c.name for c in MethodTester.__subclasses__()}
    assert tested == set(EXPAND_METHODS.names())


def test_extract_subset_keeps_earlier_erasing_rounds_whole(tiny_setup, tmp_path):
    """run_expand(extract=part): fine-tunes on all images; round 1's maps cover all of them (round 2 erases
    every training image), the last round's and the output only the part."""
    from wsss.config import CamConfig, Config, ErasingConfig
    from wsss.cam.extract import extract_to_folder as run_cam_extraction
    from wsss.expand.rounds import run_expand

    cfg, train, cls_path = tiny_setup
    model, meta = load_classifier(cls_path)
    cam = CamConfig(scales=[1.0], flip=False)
    run_cam_extraction(model, train, cam, tmp_path / "seed", torch.device("cpu"), meta["mean"], meta["std"])
    full = Config(train_cls=cfg, cam=cam, expand=ExpandConfig(methods=["erasing"], epochs=1,
                                                                 erasing=ErasingConfig(rounds=2, stop_score=0.0)))
    part = train.subset([s.id for s in train.samples[:5]])
    rep = run_expand(full, train, None, cls_path, tmp_path / "seed", tmp_path / "out", torch.device("cpu"), extract=part)
    assert len(rep["rounds"]) == 2
    names = lambda d: sorted(p.stem for p in (tmp_path / "out" / d).glob("*.npz"))  # noqa: E731
    ids = sorted(s.id for s in part)
    assert names("") == ids and names("round_2/cam") == ids and names("round_2/merged") == ids
    assert len(names("round_1/cam")) == len(names("round_1/merged")) == len(train) == 24
    from wsss.models.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "out" / "round_1" / "cls" / "checkpoint.pt")["iteration"] == 3  # 24 images / 8


def test_recam_maps_ignore_what_softmax_ignores():
    """A vector added to every class's weights leaves the softmax loss unchanged, so it must leave the maps unchanged."""
    from wsss.models.classifier import ReCAMClassifier

    torch.manual_seed(0)
    model = ReCAMClassifier(create_backbone("tiny", output_stride=8), 4).eval()
    feats = torch.rand(1, model.backbone.out_channels, 6, 7)
    before = model.class_maps(feats)
    with torch.no_grad():
        model.classifier_r.weight += torch.randn(1, model.backbone.out_channels, 1, 1)
    assert torch.allclose(model.class_maps(feats), before, atol=1e-5)
