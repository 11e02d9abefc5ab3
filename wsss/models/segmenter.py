"""Segmenter registry, on any registered backbone: DeepLab v3 (ASPP), v3+ (ASPP + a low-level decoder),
v2 (ASPP-sum, LargeFOV), FCN (1x1 scores + learned upsampling; ``fcn_skip``: FCN-8s skips), U-Net
(segmentation_models_pytorch's decoder over the backbone's levels) and an HRNetV2 head (all levels fused
at stride 4); and torchvision's DeepLab v3 builders. A segmenter maps ``(B, 3, H, W)`` to logits ``(B, K, H, W)``.

Every segmenter exposes ``forward_features`` (opaque to callers) / ``forward_head`` (-> logits on a grid
covering the input: the feature grid, or finer for decoders), ``backbone`` (for freezing),
``mean``/``std``, ``param_groups`` and ``spec()``, the keyword arguments that :func:`create_segmenter`
needs to rebuild it from a checkpoint.
"""

from __future__ import annotations

import inspect
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


class LevelsSegmenter(Segmenter):
    """Base of the decoders over the backbone's levels: ``forward_features`` returns ``[x, *levels]`` (the
    input only for its size), levels from :meth:`Backbone.forward_levels` (stride 4 first)."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if not getattr(backbone, "level_channels", ()):
            raise ConfigError(f"segmenter '{type(self).__name__}' needs a backbone with multi-level features; "
                              f"'{type(backbone).__name__}' has none")
        self.backbone, self.num_classes = backbone, num_classes
        self.mean, self.std = backbone.mean, backbone.std
        self.prefers_channels_last = getattr(backbone, "prefers_channels_last", True)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x, *self.backbone.forward_levels(x)]


def _bilinear_kernel(channels: int, k: int) -> torch.Tensor:
    """Weights ``(C, 1, k, k)`` that make a depth-wise transposed conv a bilinear upsampler (FCN's init)."""
    f = (k + 1) // 2
    c = f - 1 if k % 2 == 1 else f - 0.5
    og = torch.arange(k, dtype=torch.float32)
    filt = 1 - (og - c).abs() / f
    return (filt[:, None] * filt[None, :]).expand(channels, 1, k, k).clone()


class LearnedUpsample(nn.Module):
    """FCN's learned upsampling: a transposed conv by ``factor`` (kernel ``2 factor``), initialised as
    bilinear interpolation, then cropped to the target size. ``(B, K, h, w) -> (B, K, H, W)``."""

    def __init__(self, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        if factor > 1:
            self.up = nn.ConvTranspose2d(channels, channels, 2 * factor, factor, padding=factor // 2, bias=False,
                                         groups=channels)
            with torch.no_grad():
                self.up.weight.copy_(_bilinear_kernel(channels, 2 * factor))

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.factor > 1:
            x = self.up(x)
        if x.shape[-2] < size[0] or x.shape[-1] < size[1]:  # odd sizes: ceil(H/s) * s >= H always; guard anyway
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x[..., :size[0], :size[1]]


class FCN(LevelsSegmenter):
    """FCN (Long et al. 2015). Plain: a 1x1 classifier on the deepest level and one learned upsampling
    to the input (FCN-32s at stride 32). ``skip=True`` (FCN-8s): 1x1 scores on the deepest level of each
    stride from 8 up, fused coarse to fine (learned 2x upsampling, then sum), then learned upsampling by 8."""

    def __init__(self, backbone: nn.Module, num_classes: int, skip: bool = False, dropout: float = 0.1) -> None:
        super().__init__(backbone, num_classes)
        strides = list(getattr(backbone, "level_strides", ())) or self._strides(backbone)
        last = len(strides) - 1
        if skip:  # the deepest level of each distinct stride >= 8
            picks = [i for i in range(len(strides)) if strides[i] >= 8 and (i == last or strides[i + 1] != strides[i])]
        else:
            picks = [last]
        self.picks, self.skip = picks, skip
        chans = list(backbone.level_channels)
        self.drop = nn.Dropout2d(dropout)
        self.scores = nn.ModuleList(nn.Conv2d(chans[i], num_classes, 1) for i in picks)
        self.fuse_up = nn.ModuleList(LearnedUpsample(num_classes, strides[a] // strides[b])
                                     for a, b in zip(picks[::-1][:-1], picks[::-1][1:]))
        self.final_up = LearnedUpsample(num_classes, strides[picks[0]])

    @staticmethod
    def _strides(backbone: nn.Module) -> list[int]:
        x = torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            return [64 // f.shape[-1] for f in backbone.eval().forward_levels(x)]

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x, levels = feats[0], feats[1:]
        outs = [score(self.drop(levels[i]) if i == self.picks[-1] else levels[i]) for i, score in zip(self.picks, self.scores)]
        y = outs[-1]
        for up, finer in zip(self.fuse_up, outs[::-1][1:]):
            y = up(y, finer.shape[-2:]) + finer
        return self.final_up(y, x.shape[-2:])

    def head_modules(self) -> list[nn.Module]:
        return [self.scores, self.fuse_up, self.final_up]


class UNet(LevelsSegmenter):
    """U-Net (Ronneberger et al. 2015) decoder over the backbone's levels: from the deepest level, each
    block upsamples to the next finer level, concatenates it (the skip connection) and applies two 3x3
    convs; a last block reaches the input resolution. The decoder is segmentation_models_pytorch's
    ``UnetDecoder`` (it resizes to each skip's size, so dilated backbones with equal-stride levels fit)."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None) -> None:
        super().__init__(backbone, num_classes)
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        n = len(backbone.level_channels)
        dec = list(decoder_channels) if decoder_channels else [max(16, 256 >> i) for i in range(n)]
        if len(dec) != n:
            raise ConfigError(f"segmenter 'unet': decoder_channels needs {n} values (one per backbone level), got {len(dec)}")
        self.decoder = UnetDecoder(encoder_channels=[3, *backbone.level_channels], decoder_channels=dec, n_blocks=n)
        self.classifier = nn.Conv2d(dec[-1], num_classes, 3, padding=1)

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.decoder(feats))

    def head_modules(self) -> list[nn.Module]:
        return [self.decoder, self.classifier]


class HRNetHead(LevelsSegmenter):
    """HRNetV2's segmentation head (Sun et al. 2019 / Wang et al. 2020): every level (resolution stream)
    upsampled to the finest, concatenated, a 1x1 conv-BN-ReLU to ``channels``, a 1x1 classifier. On
    ``timm:hrnet_*`` backbones these are HRNet's own parallel streams."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__(backbone, num_classes)
        self.fuse = nn.Sequential(_conv_bn_relu(sum(backbone.level_channels), channels, 1), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward_head(self, feats: list[torch.Tensor]) -> torch.Tensor:
        levels = feats[1:]
        size = levels[0].shape[-2:]
        up = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels]
        return self.classifier(self.fuse(torch.cat(up, 1)))

    def head_modules(self) -> list[nn.Module]:
        return [self.fuse, self.classifier]


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


def _on_backbone(cls, **fixed):
    def factory(num_classes: int, backbone: str = "tiny", pretrained: bool | str = False, output_stride: int = 16,
                **kw) -> Segmenter:
        bad = sorted(set(kw) - factory.options)
        if bad:  # before the (possibly slow) backbone is built
            raise ConfigError(f"takes no option(s) {', '.join(bad)} (it takes: {', '.join(sorted(factory.options))})")
        net = cls(create_backbone(backbone, pretrained=pretrained, output_stride=output_stride), num_classes, **fixed, **kw)
        net._spec = {"backbone": backbone, "output_stride": net.backbone.output_stride, **kw}
        return net

    #: the head options this segmenter takes (checked when a config is loaded)
    factory.options = set(inspect.signature(cls).parameters) - {"backbone", "num_classes", *fixed}
    return factory


SEGMENTERS.register("deeplabv3")(_on_backbone(DeepLabV3))
SEGMENTERS.register("deeplabv3plus")(_on_backbone(DeepLabV3Plus))
SEGMENTERS.register("deeplabv2")(_on_backbone(DeepLabV2))
SEGMENTERS.register("deeplabv2_largefov")(_on_backbone(DeepLabV2, largefov=True))
SEGMENTERS.register("fcn")(_on_backbone(FCN))
SEGMENTERS.register("fcn_skip")(_on_backbone(FCN, skip=True))
SEGMENTERS.register("unet")(_on_backbone(UNet))
SEGMENTERS.register("hrnet")(_on_backbone(HRNetHead))


def _torchvision(builder: str):
    def factory(num_classes: int, pretrained: bool | str = False, **kw) -> Segmenter:
        # backbone/output_stride are fixed by the builder (ResNet: stride 8; MobileNetV3: 16)
        kw.pop("backbone", None), kw.pop("output_stride", None)
        if kw:
            raise ConfigError(f"takes no option(s) {', '.join(sorted(kw))}")
        net = TorchvisionDeepLab(builder, num_classes, pretrained)
        net._spec = {}
        return net

    factory.options = set()
    return factory


for _b in ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"):
    SEGMENTERS.register(f"tv_{_b}")(_torchvision(_b))


def create_segmenter(name: str, num_classes: int, pretrained: bool | str = False, **kw) -> Segmenter:
    """Create a registered segmenter; ``pretrained`` is the backbone's ImageNet weights (bool or path).

    ``kw``: ``backbone``, ``output_stride`` and the head's options (``SEGMENTERS.get(name).options``).
    """
    import wsss.models  # noqa: F401  (registers the backbones)

    factory = SEGMENTERS.get(name)
    try:
        return factory(num_classes=num_classes, pretrained=pretrained, **kw)
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"segmenter '{name}': {brief(e, 160)}") from None
