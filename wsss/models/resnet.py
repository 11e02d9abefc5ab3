"""torchvision ResNet-18/34/50/101 backbones, output stride 32, 16 or 8 (dilated later stages).

ImageNet weights (``pretrained=True``) come from torchvision's cache
(``$TORCH_HOME/hub/checkpoints``); when they are not cached the download is attempted and, offline,
fails with a message saying where to put the file. ``pretrained`` may also be a local ``.pth`` path.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.errors import WsssError, brief
from wsss.models.backbones import BACKBONES, Backbone
from wsss.models.weights import load_state_dict_file

log = logging.getLogger(__name__)

_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
}


def _dilate(layer: nn.Sequential, prev_dilation: int, dilation: int) -> None:
    """Turn a stride-2 stage into a stride-1 stage with dilated 3x3 convolutions."""
    first = True
    for block in layer:
        convs = (block.conv1, block.conv2) if isinstance(block, BasicBlock) else (block.conv2,)
        for conv in convs:
            conv.stride = (1, 1)
            d = prev_dilation if first else dilation
            conv.dilation, conv.padding = (d, d), (d, d)
            first = False
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


class ResNetBackbone(Backbone):
    """ResNet feature extractor: ``(B, 3, H, W)`` -> ``(B, C, H/s, W/s)`` (C = 512 or 2048)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, name: str, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        net = getattr(torchvision.models, name)(weights=None)
        if output_stride <= 16:
            _dilate(net.layer4, 1 if output_stride == 16 else 2, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(net.layer3, 1, 2)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features
        self.output_stride = output_stride
        self.name = name
        expansion = self.out_channels // 512  # 1 for basic blocks, 4 for bottlenecks
        self.level_channels = tuple(c * expansion for c in (64, 128, 256, 512))

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))]
        for layer in (self.layer2, self.layer3, self.layer4):
            out.append(layer(out[-1]))
        return out


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``name``: from its cache, else a download attempt that fails
    offline with a clear message (never hangs: 20 s socket timeout)."""
    weights = _WEIGHTS[name]
    fname = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if cached.is_file():
        return load_state_dict_file(cached, name)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:
        raise WsssError(f"ImageNet weights for {name} are not cached at {cached} and could not be downloaded "
                        f"({type(e).__name__}); copy {fname} there, or set pretrained to a local .pth path") from None
    finally:
        socket.setdefaulttimeout(old)


def _build(name: str):
    def factory(pretrained: bool | str = False, output_stride: int = 16) -> ResNetBackbone:
        net = ResNetBackbone(name, output_stride)
        if pretrained:
            sd = imagenet_state_dict(name) if pretrained is True else load_state_dict_file(pretrained, name)
            sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
            try:
                net.load_state_dict(sd)
            except RuntimeError as e:
                raise WsssError(f"weights do not fit {name} ({brief(e, 160)})",
                                None if pretrained is True else pretrained) from None
        return net

    return factory


for _name in _WEIGHTS:
    BACKBONES.register(_name)(_build(_name))
