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


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_continues_exactly(tiny_data, tmp_path, monkeypatch, ema_decay):
    tr, va = tiny_data
    cfg = TrainClsConfig(**CFG, ema_decay=ema_decay)
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
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    if ema_decay:  # the model file holds the average, the checkpoint also the last weights to resume from
        assert all(torch.equal(full[k], ck["ema"][f"module.{k}"]) for k in full)
        assert not torch.equal(full["classifier.weight"], ck["model"]["classifier.weight"])
    else:
        assert "ema" not in ck and all(torch.equal(full[k], ck["model"][k]) for k in full)


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


class _Pairs(torch.utils.data.Dataset):
    """12 fixed (x (3,), y (1,)) pairs for a linear model."""

    epoch = 0

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _fit_linear(tmp_path, ema_decay: float, seen: list, evaluated: list) -> torch.nn.Module:
    """Two epochs of 3 SGD steps on a linear model; ``seen`` gets the weight each step starts from,
    ``evaluated`` the weight ``evaluate`` sees after each epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "base_lr": 0.1}], lr=0.1)

    def loss_fn(m, x, y):
        seen.append(m.weight.detach().clone())
        return ((m(x) - y) ** 2).mean()

    cfg = TrainClsConfig(**{**CFG, "optimizer": "sgd", "lr": 0.1, "ema_decay": ema_decay})
    core.fit(model, opt, _Pairs(), loss_fn, cfg, tmp_path, name="t", device=torch.device("cpu"), resume=False,
             steps_per_epoch=3, batches=lambda e: [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
             evaluate=lambda e: evaluated.append(model.weight.detach().clone()) or {})
    return model


def test_ema_is_the_moving_average_of_the_steps_and_leaves_training_alone(tmp_path):
    plain_seen, ema_seen, plain_eval, ema_eval = [], [], [], []
    plain = _fit_linear(tmp_path / "a", 0.0, plain_seen, plain_eval)
    averaged = _fit_linear(tmp_path / "b", 0.5, ema_seen, ema_eval)
    # the steps themselves are the same: evaluating on the average put the own weights back
    assert len(ema_seen) == 6 and all(torch.equal(a, b) for a, b in zip(plain_seen, ema_seen))
    after_step = plain_seen[1:] + [plain.weight.detach()]  # weights after steps 1..6
    expected, per_epoch = after_step[0].clone(), []
    for k, w in enumerate(after_step[1:], start=2):
        expected = 0.5 * expected + 0.5 * w
        if k % 3 == 0:
            per_epoch.append(expected.clone())
    assert torch.allclose(averaged.weight, expected, atol=1e-7)
    assert not torch.allclose(averaged.weight, plain.weight, atol=1e-4)
    assert torch.allclose(ema_eval[0], per_epoch[0], atol=1e-7) and torch.allclose(ema_eval[1], per_epoch[1], atol=1e-7)
    assert torch.equal(plain_eval[1], plain.weight.detach())


def test_ema_decay_must_be_below_one():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainClsConfig(ema_decay=1.0)
