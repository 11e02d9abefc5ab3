"""Backbone registry. A backbone maps ``(B, 3, H, W)`` to features ``(B, C, H/s, W/s)``.

Every backbone exposes ``out_channels``, ``output_stride``, ``stem_modules()`` (modules that a
"freeze stem" option freezes) and ``mean``/``std`` (the input normalisation it was trained with).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.registry import Registry

log = logging.getLogger(__name__)

BACKBONES: Registry[nn.Module] = Registry("backbone")


class Backbone(nn.Module):
    out_channels: int
    output_stride: int
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    #: whether NHWC (channels_last) layout is faster for this architecture on CPU (measured: 3-9x for
    #: ResNet and EfficientNet-Lite; 5x slower for the tiny dilated CNN)
    prefers_channels_last = True

    def stem_modules(self) -> list[nn.Module]:
        return []

    #: channels of each tensor :meth:`forward_levels` returns
    level_channels: tuple[int, ...] = ()

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features at increasing depth: stride 4, stride 8, ..., the output last (what the affinity
        stage learns pixel similarity from). ``(B, 3, H, W)`` -> list of ``(B, C_l, H/s_l, W/s_l)``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose multi-level features")

    def levels_to_output(self, last: torch.Tensor) -> torch.Tensor:
        """The backbone's output from the last tensor :meth:`forward_levels` returns (the same tensor here;
        a backbone whose output adds layers after its last level applies them)."""
        return last


def create_backbone(name: str, pretrained: bool | str = False, output_stride: int = 16, **kw) -> Backbone:
    """Create a registered backbone. ``pretrained``: False, True (the packaged/cached ImageNet
    weights) or a path to a ``.pth`` state dict."""
    return BACKBONES.create(name, pretrained=pretrained, output_stride=output_stride, **kw)


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyNet(Backbone):
    """A small 6-layer CNN for tests and the synthetic data (about 0.1 GFLOPs at 128x128).

    Output stride 8 (or 16 when asked: the last downsampling is then kept instead of dilated away).
    """

    prefers_channels_last = False

    def __init__(self, width: int = 32, output_stride: int = 8) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"tiny backbone supports output_stride 8 or 16, got {output_stride}")
        w = width
        self.stem = _conv_bn(3, w // 2, 2)
        self.layer1 = nn.Sequential(_conv_bn(w // 2, w, 2), _conv_bn(w, w))
        self.layer2 = nn.Sequential(_conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w))
        last_stride = 2 if output_stride == 16 else 1
        self.layer3 = nn.Sequential(_conv_bn(2 * w, 4 * w, last_stride), _conv_bn(4 * w, 4 * w, dilation=2))
        self.out_channels = 4 * w
        self.output_stride = output_stride
        self.level_channels = (w, 2 * w, 4 * w)

    def stem_modules(self) -> list[nn.Module]:
        return [self.stem]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.layer1(self.stem(x))
        b = self.layer2(a)
        return [a, b, self.layer3(b)]


@BACKBONES.register("tiny")
def _tiny(pretrained: bool | str = False, output_stride: int = 8, width: int = 32) -> TinyNet:
    if pretrained:
        from wsss.errors import ConfigError

        if pretrained is True:
            raise ConfigError("backbone 'tiny' has no pretrained weights (set train_cls.pretrained=false)")
    net = TinyNet(width=width, output_stride=8 if output_stride not in (8, 16) else output_stride)
    if isinstance(pretrained, str):
        from wsss.models.weights import load_state_dict_file

        net.load_state_dict(load_state_dict_file(pretrained, "tiny"))
    return net
