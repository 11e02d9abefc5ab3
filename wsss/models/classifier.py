"""The multi-label CAM classifier: backbone -> features -> GAP -> 1x1 conv (no bias) -> logits.

Because the head is linear after global average pooling, ``cam(features)`` (the same 1x1 conv applied
before pooling) is exactly the class activation map of Zhou et al. 2016, and gradient CAM methods
target ``forward_features`` output without hooks on internal layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsss.models.backbones import Backbone


class Classifier(nn.Module):
    """``forward(x) -> logits (B, K)``; ``forward_features(x) -> (B, C, h, w)``; ``forward_head(f) -> (B, K)``."""

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, H/s, W/s)``."""
        return self.backbone(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> logits ``(B, K)`` (global average pooling, then the linear head)."""
        pooled = F.adaptive_avg_pool2d(self.dropout(feats), 1)
        return self.classifier(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam(self, feats: torch.Tensor) -> torch.Tensor:
        """Raw class activation maps ``(B, K, h, w)`` from features (ReLU applied, not normalised)."""
        return F.relu(F.conv2d(feats, self.classifier.weight))

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at ``lr``, the new head at ``lr * head_lr_mult`` (frozen parameters left out)."""
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return [{"params": back, "lr": lr, "base_lr": lr}, {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult}]
