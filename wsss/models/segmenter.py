"""Segmenter registry: DeepLab v3 (ASPP), v3+ (ASPP + a low-level decoder) and v2 (ASPP-sum, LargeFOV) on
any registered backbone, and torchvision's DeepLab v3 builders. A segmenter maps ``(B, 3, H, W)`` to logits ``(B, K, H, W)``.

Every segmenter exposes ``forward_features`` / ``forward_head`` (features -> logits at feature
resolution), ``backbone`` (for freezing), ``mean``/``std``, ``param_groups`` and ``spec()``, the
keyword arguments that :func:`create_segmenter` needs to rebuild it from a checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError, WsssError, brief
from wsss.models.backbones import create_backbone
from wsss.registry import Registry

log = logging.getLogger(__name__)

SEGMENTERS: Registry[nn.Module] = Registry("segmenter")


class Segmenter(nn.Module):
    """Base: ``forward(x (B, 3, H, W)) -> logits (B, K, H, W)``."""

    backbone: nn.Module
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    prefers_channels_last: bool = True

    def __init__(self) -> None:
        super().__init__()
        self._spec: dict[str, Any] = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> backbone features ``(B, C, h, w)``."""
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Features ``(B, C, h, w)`` -> logits ``(B, K, h, w)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_head(self.forward_features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def head_modules(self) -> list[nn.Module]:
        """Newly initialised modules (trained at ``lr * head_lr_mult``)."""
        raise NotImplementedError

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at ``lr``, the new head at ``lr * head_lr_mult`` (frozen parameters left out)."""
        head_ids = {id(p) for m in self.head_modules() for p in m.parameters()}
        back = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        head = [p for m in self.head_modules() for p in m.parameters() if p.requires_grad]
        return [{"params": back, "lr": lr, "base_lr": lr},
                {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult}]

    def stem_modules(self) -> list[nn.Module]:
        fn = getattr(self.backbone, "stem_modules", None)
        return fn() if fn is not None else []

    def spec(self) -> dict[str, Any]:
        """What :func:`create_segmenter` needs (besides ``pretrained``) to rebuild this model."""
        return dict(self._spec)


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if k == 1 else dilation * (k - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLab v3's atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate and an image
    pooling branch, concatenated and projected: ``(B, C, h, w)`` -> ``(B, channels, h, w)``.

    The pooling branch has no batch norm: it sees one value per channel and image, so batch norm there
    fails for a batch of one and is noisy for small batches."""

    def __init__(self, cin: int, channels: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, channels, 1)] +
                                      [_conv_bn_relu(cin, channels, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, channels, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))


def _rates(rates: Sequence[int] | None, default: Sequence[int], default_os: int, output_stride: int) -> list[int]:
    """The configured rates, or the paper's rates rescaled from the stride they were designed for."""
    if rates:
        return [int(r) for r in rates]
    return [max(1, round(r * default_os / output_stride)) for r in default]


class DeepLabV3(Segmenter):
    """DeepLab v3 (Chen et al. 2017): backbone -> ASPP -> 3x3 conv -> 1x1 classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 256, rates: Sequence[int] | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone, self.num_classes = backbone, num_classes
        self.mean, self.std = backbone.mean, backbone.std
        self.prefers_channels_last = getattr(backbone, "prefers_channels_last", True)
        self.rates = _rates(rates, (6, 12, 18), 16, backbone.output_stride)
        self.aspp = ASPP(backbone.out_channels, channels, self.rates, dropout)
        self.head = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.aspp(feats)))

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.head, self.classifier]


class DeepLabV3Plus(DeepLabV3):
    """DeepLab v3+ (Chen et al. 2018): DeepLab v3's ASPP on the last features, upsampled to the backbone's
    first (stride-4) level, concatenated with that level projected to ``low_channels`` by a 1x1 conv, and
    refined by two 3x3 convs: the low-level features give back the object boundaries that stride 8-16
    features blur. ``forward_features`` returns ``[low (B, C_0, H/4, W/4), output (B, C, H/s, W/s)]``."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 256, rates: Sequence[int] | None = None,
                 dropout: float = 0.1, low_channels: int = 48) -> None:
        super().__init__(backbone, num_classes, channels, rates, dropout)
        if not getattr(backbone, "level_channels", ()):
            raise ConfigError(f"segmenter 'deeplabv3plus' needs a backbone with multi-level features; "
                              f"'{type(backbone).__name__}' has none")
        self.low = _conv_bn_relu(backbone.level_channels[0], low_channels, 1)
        self.head = nn.Sequential(_conv_bn_relu(channels + low_channels, channels, 3), _conv_bn_relu(channels, channels, 3))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = self.backbone.forward_levels(x)
        return [levels[0], self.backbone.levels_to_output(levels[-1])]

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        low, top = feats[0], feats[-1]
        y = F.interpolate(self.aspp(top), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.head(torch.cat([y, self.low(low)], 1)))

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.low, self.head, self.classifier]


class DeepLabV2(Segmenter):
    """DeepLab v2 (Chen et al. 2016): ASPP-sum (one dilated 3x3 classifier per rate, logits summed), or
    LargeFOV (one 3x3 conv at rate 12 with 1024 channels, then two 1x1 convs)."""

    def __init__(self, backbone: nn.Module, num_classes: int, rates: Sequence[int] | None = None,
                 largefov: bool = False, channels: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.backbone, self.num_classes, self.largefov = backbone, num_classes, largefov
        self.mean, self.std = backbone.mean, backbone.std
        self.prefers_channels_last = getattr(backbone, "prefers_channels_last", True)
        cin = backbone.out_channels
        if largefov:
            self.rates = _rates(rates, (12,), 8, backbone.output_stride)
            r = self.rates[0]
            self.branches = nn.ModuleList([nn.Sequential(
                nn.Conv2d(cin, channels, 3, padding=r, dilation=r), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
                nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Dropout2d(dropout),
                nn.Conv2d(channels, num_classes, 1))])
        else:
            self.rates = _rates(rates, (6, 12, 18, 24), 8, backbone.output_stride)
            self.branches = nn.ModuleList([nn.Conv2d(cin, num_classes, 3, padding=r, dilation=r) for r in self.rates])
            for b in self.branches:
                nn.init.normal_(b.weight, std=0.01)
                nn.init.zeros_(b.bias)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](feats)
        for b in self.branches[1:]:
            out = out + b(feats)
        return out

    def head_modules(self) -> list[nn.Module]:
        return [self.branches]


class TorchvisionDeepLab(Segmenter):
    """torchvision's ``deeplabv3_*`` builders behind the same interface (ImageNet backbone weights from
    torchvision's cache or a local file; never the COCO segmentation weights)."""

    def __init__(self, builder: str, num_classes: int, pretrained: bool | str = False) -> None:
        super().__init__()
        from torchvision.models import segmentation as tvseg

        from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        net = getattr(tvseg, builder)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
        self.backbone, self.head, self.num_classes = net.backbone, net.classifier, num_classes
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.builder = builder
        if pretrained:
            self._load_backbone(pretrained)

    def _load_backbone(self, pretrained: bool | str) -> None:
        from wsss.models.weights import load_state_dict_file

        arch = self.builder.removeprefix("deeplabv3_")
        if pretrained is True:
            sd = _torchvision_imagenet(arch)
        else:
            sd = load_state_dict_file(pretrained, arch)
        if arch.startswith("mobilenet"):
            # torchvision's IntermediateLayerGetter keeps mobilenet's `features` children as top-level names
            sd = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
        else:
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        missing, unexpected = self.backbone.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise WsssError(f"ImageNet weights do not fit {self.builder}'s backbone (missing {list(missing)[:3]}, "
                            f"unexpected {list(unexpected)[:3]})")

    def stem_modules(self) -> list[nn.Module]:
        names = ("conv1", "bn1") if hasattr(self.backbone, "conv1") else ("0",)
        return [getattr(self.backbone, n) for n in names if hasattr(self.backbone, n)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)["out"]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats)

    def head_modules(self) -> list[nn.Module]:
        return [self.head]


def _torchvision_imagenet(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of a torchvision classification model, from torchvision's cache (clear error
    offline: no download is attempted here for the MobileNet, the ResNets share the backbone loader)."""
    if arch.startswith("resnet"):
        from wsss.models.resnet import imagenet_state_dict

        return imagenet_state_dict(arch)
    import os
    from pathlib import Path

    from torchvision.models import MobileNet_V3_Large_Weights

    from wsss.models.weights import load_state_dict_file

    weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file():
        raise WsssError(f"ImageNet weights for {arch} are not cached at {cached}; copy {cached.name} there, "
                        f"or set train_seg.pretrained to a local .pth path")
    return load_state_dict_file(cached, arch)


def _deeplab(cls, **fixed):
    def factory(num_classes: int, backbone: str = "tiny", pretrained: bool | str = False, output_stride: int = 16,
                **kw) -> Segmenter:
        net = cls(create_backbone(backbone, pretrained=pretrained, output_stride=output_stride), num_classes, **fixed, **kw)
        net._spec = {"backbone": backbone, "output_stride": net.backbone.output_stride, **kw}
        return net

    return factory


SEGMENTERS.register("deeplabv3")(_deeplab(DeepLabV3))
SEGMENTERS.register("deeplabv3plus")(_deeplab(DeepLabV3Plus))
SEGMENTERS.register("deeplabv2")(_deeplab(DeepLabV2))
SEGMENTERS.register("deeplabv2_largefov")(_deeplab(DeepLabV2, largefov=True))


def _torchvision(builder: str):
    def factory(num_classes: int, pretrained: bool | str = False, **kw) -> Segmenter:
        # backbone/output_stride are fixed by the builder (ResNet: stride 8; MobileNetV3: 16)
        kw.pop("backbone", None), kw.pop("output_stride", None)
        if kw:
            raise ConfigError(f"segmenter 'tv_{builder}' takes no option(s) {', '.join(sorted(kw))}")
        net = TorchvisionDeepLab(builder, num_classes, pretrained)
        net._spec = {}
        return net

    return factory


for _b in ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"):
    SEGMENTERS.register(f"tv_{_b}")(_torchvision(_b))


def create_segmenter(name: str, num_classes: int, pretrained: bool | str = False, **kw) -> Segmenter:
    """Create a registered segmenter; ``pretrained`` is the backbone's ImageNet weights (bool or path).

    ``kw``: ``backbone``, ``output_stride`` and the head's options (``channels``, ``rates``, ``dropout``).
    """
    import wsss.models  # noqa: F401  (registers the backbones)

    factory = SEGMENTERS.get(name)
    try:
        return factory(num_classes=num_classes, pretrained=pretrained, **kw)
    except TypeError as e:
        raise ConfigError(f"segmenter '{name}': {brief(e, 120)}") from None
