from __future__ import annotations

import pytest
import torch

from wsss.config import SynthConfig, TrainClsConfig
from wsss.data.dataset import load_voc
from wsss.data.synth import generate
from wsss.errors import WsssError
from wsss.engine import core
from wsss.engine.classifier import train_classifier
from wsss.engine.core import poly_lr
from wsss.models.checkpoint import build_classifier, load_classifier


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = generate(SynthConfig(n_train=24, n_val=8, size=48), tmp_path_factory.mktemp("d") / "s")
    return load_voc(root, "train"), load_voc(root, "val")


CFG = dict(backbone="tiny", output_stride=8, epochs=2, batch_size=8, crop_size=48, optimizer="adamw", lr=3e-3, head_lr_mult=1.0)


def test_train_writes_artifacts_and_loads_safely(tiny_data, tmp_path):
    tr, va = tiny_data
    summary = train_classifier(TrainClsConfig(**CFG), tr, tmp_path, va, seed=0)
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and "val_mAP" in summary["final"]
    for f in ("classifier.pt", "checkpoint.pt", "log.csv", "config.yaml"):
        assert (tmp_path / f).is_file()
    model, meta = load_classifier(tmp_path / "classifier.pt")
    assert meta["classes"] == tr.classes and model.num_classes == tr.num_classes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_resume_continues_exactly(tiny_data, tmp_path, monkeypatch):
    tr, va = tiny_data
    cfg = TrainClsConfig(**CFG)
    train_classifier(cfg, tr, tmp_path / "a", seed=3)
    full = torch.load(tmp_path / "a" / "classifier.pt", weights_only=True)["model"]

    real_save = core.save_checkpoint
    calls = {"n": 0}

    def dying_save(path, obj):
        real_save(path, obj)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(core, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(cfg, tr, tmp_path / "b", seed=3)
    monkeypatch.setattr(core, "save_checkpoint", real_save)
    assert not (tmp_path / "b" / "classifier.pt").exists()
    train_classifier(cfg, tr, tmp_path / "b", seed=3, resume=True)
    resumed = torch.load(tmp_path / "b" / "classifier.pt", weights_only=True)["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_refuses_changed_recipe(tiny_data, tmp_path):
    tr, _ = tiny_data
    train_classifier(TrainClsConfig(**{**CFG, "epochs": 1}), tr, tmp_path, seed=0)
    with pytest.raises(WsssError, match="train_cls.lr differ"):
        train_classifier(TrainClsConfig(**{**CFG, "lr": 0.1}), tr, tmp_path, seed=0, resume=True)


def test_freeze_bn_and_stem_keep_parameters(tiny_data, tmp_path):
    tr, _ = tiny_data
    cfg = TrainClsConfig(**{**CFG, "epochs": 1, "freeze_bn": True, "freeze_stem": True})
    torch.manual_seed(0)
    before = build_classifier(cfg, tr.num_classes).state_dict()
    train_classifier(cfg, tr, tmp_path, seed=0)
    after = torch.load(tmp_path / "classifier.pt", weights_only=True)["model"]
    assert torch.equal(before["backbone.stem.0.weight"], after["backbone.stem.0.weight"])
    assert torch.equal(before["backbone.layer2.0.1.running_mean"], after["backbone.layer2.0.1.running_mean"])
    assert not torch.equal(before["backbone.layer2.0.0.weight"], after["backbone.layer2.0.0.weight"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_bad_checkpoints_give_clear_errors(tmp_path, content):
    p = tmp_path / "c.pt"
    if content is None:  # truncated real checkpoint
        torch.save({"model": {"w": torch.zeros(1000)}, "meta": {}}, p)
        p.write_bytes(p.read_bytes()[:200])
    else:
        p.write_bytes(content)
    with pytest.raises(WsssError, match="cannot load checkpoint"):
        load_classifier(p)


def test_checkpoint_from_another_backbone(tiny_data, tmp_path):
    tr, _ = tiny_data
    train_classifier(TrainClsConfig(**{**CFG, "epochs": 1}), tr, tmp_path, seed=0)
    obj = torch.load(tmp_path / "classifier.pt", weights_only=True)
    obj["meta"]["backbone"] = "resnet18"
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(WsssError, match="do not fit backbone 'resnet18'"):
        load_classifier(tmp_path / "x.pt")


def test_poly_lr():
    assert poly_lr(1.0, 0, 100) == 1.0
    assert 0 < poly_lr(1.0, 99, 100) < 0.02
    assert poly_lr(1.0, 0, 100, warmup=10) == pytest.approx(0.1)
