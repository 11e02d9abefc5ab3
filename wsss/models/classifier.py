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

    #: parameter-name prefixes of heads a subclass adds: they stay freshly initialised when fine-tuning
    #: starts from a plain classifier's weights
    extra_heads: tuple[str, ...] = ()

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
        return F.relu(self.class_maps(feats))

    def class_maps(self, feats: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Linear class maps ``(B, k, h, w)`` (before ReLU) of ``classes (k,)`` (default: all), from
        features ``(B, C, h, w)``. Subclasses with several heads fuse them here."""
        w = self.classifier.weight if classes is None else self.classifier.weight[classes]
        return F.conv2d(feats, w)

    def training_logits(self, feats: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The logits ``(B, K)`` each trained against ``labels (B, K)``: one head here."""
        return [self.forward_head(feats)]

    def head_config(self) -> dict:
        """What :func:`create_classifier` needs besides the backbone to rebuild this head."""
        return {"head": "gap"}

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at ``lr``, the new head at ``lr * head_lr_mult`` (frozen parameters left out)."""
        back = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return [{"params": back, "lr": lr, "base_lr": lr}, {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult}]


class ACoLClassifier(Classifier):
    """ACoL (Zhang et al. 2018): a second head ``classifier_b`` learns from the features with the first
    head's most discriminative region erased (``features * (cam_a < threshold)``), so it has to find
    the rest of the object. Logits are head A's; class maps are the element-wise max of both heads."""

    extra_heads = ("classifier_b.",)

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0, threshold: float = 0.6) -> None:
        super().__init__(backbone, num_classes, dropout)
        self.threshold = threshold
        self.classifier_b = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier_b.weight, std=0.01)

    def class_maps(self, feats: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        wa, wb = self.classifier.weight, self.classifier_b.weight
        if classes is not None:
            wa, wb = wa[classes], wb[classes]
        return torch.maximum(F.conv2d(feats, wa), F.conv2d(feats, wb))

    def erase_mask(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, 1, h, w)`` 1 where head A's max-normalised map of any labelled class (``labels (B, K)``
        multi-hot) exceeds the threshold; computed without gradient."""
        with torch.no_grad():
            cam = F.relu(F.conv2d(feats, self.classifier.weight))
            cam = cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(1e-5)
            cam = cam * (labels[:, :, None, None] > 0)
            return (cam.amax(1, keepdim=True) > self.threshold).to(feats.dtype)

    def training_logits(self, feats: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """Logits ``(B, K)`` of head A, and of head B on the features ``(B, C, h, w)`` with head A's
        discriminative region (for the ``labels (B, K)``) erased."""
        logits_a = self.forward_head(feats)
        erased = feats * (1 - self.erase_mask(feats, labels))
        pooled = F.adaptive_avg_pool2d(self.dropout(erased), 1)
        return [logits_a, self.classifier_b(pooled).flatten(1)]

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        groups = super().param_groups(lr, head_lr_mult)
        groups[1]["params"] = groups[1]["params"] + [p for p in self.classifier_b.parameters() if p.requires_grad]
        return groups

    def head_config(self) -> dict:
        return {"head": "acol", "acol_threshold": self.threshold}


class MultiDilatedClassifier(Classifier):
    """Multiple receptive fields (Wei et al. CVPR 2018): besides the 1x1 head, 3x3 heads dilated at
    ``rates`` on the same features, each trained with the classification loss. A dilated head sees a
    wider context, so its map spreads to less discriminative parts; class maps fuse as in the paper:
    the rate-1 map plus the mean of the dilated maps (the mean keeps one rate's false positives down)."""

    extra_heads = ("dilated.",)

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0, rates: tuple[int, ...] = (3, 6, 9)) -> None:
        super().__init__(backbone, num_classes, dropout)
        self.rates = [int(r) for r in rates]
        self.dilated = nn.ModuleList(nn.Conv2d(backbone.out_channels, num_classes, 3, padding=r, dilation=r, bias=False)
                                     for r in self.rates)
        for conv in self.dilated:
            nn.init.normal_(conv.weight, std=0.01)

    def class_maps(self, feats: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        maps = [F.conv2d(feats, conv.weight if classes is None else conv.weight[classes], padding=r, dilation=r)
                for conv, r in zip(self.dilated, self.rates)]
        return super().class_maps(feats, classes) + torch.stack(maps).mean(0)

    def training_logits(self, feats: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """Logits ``(B, K)`` of the 1x1 head and of each dilated head (global average pooling of its map)."""
        f = self.dropout(feats)
        return [self.forward_head(feats)] + [F.adaptive_avg_pool2d(conv(f), 1).flatten(1) for conv in self.dilated]

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        groups = super().param_groups(lr, head_lr_mult)
        groups[1]["params"] = groups[1]["params"] + [p for p in self.dilated.parameters() if p.requires_grad]
        return groups

    def head_config(self) -> dict:
        return {"head": "multi_dilated", "dilated_rates": list(self.rates)}


#: logit scale of ReCAM's softmax on unit-length CAM-weighted features
RECAM_SCALE = 10.0


class ReCAMClassifier(Classifier):
    """ReCAM (Chen et al. CVPR 2022): a second 1x1 head ``classifier_r`` learns, with softmax cross-entropy,
    to name the class of features pooled under that class's own map (CAM-weighted features). Unlike the
    multi-label loss, softmax makes classes compete, which re-activates the object parts the first head
    leaves dim; class maps come from the re-activated head, centred over the classes: softmax ignores a
    vector added to every class's weights, so without centring that free component (any feature energy)
    could light up every map alike."""

    extra_heads = ("classifier_r.",)

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(backbone, num_classes, dropout)
        self.classifier_r = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.normal_(self.classifier_r.weight, std=0.01)

    def class_maps(self, feats: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        w = self.classifier_r.weight - self.classifier_r.weight.mean(0, keepdim=True)
        return F.conv2d(feats, w if classes is None else w[classes])

    def recam_loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Softmax cross-entropy of ``classifier_r`` on the features ``(B, C, h, w)`` pooled under each
        labelled class's max-normalised first-head map (``labels (B, K)``, positive where > 0.5)."""
        b_idx, k_idx = torch.nonzero(labels > 0.5, as_tuple=True)
        if len(b_idx) == 0:
            return feats.sum() * 0.0
        f = feats[b_idx]  # (N, C, h, w): one row per (image, labelled class)
        cam = F.relu(torch.einsum("nchw,nc->nhw", f, self.classifier.weight[k_idx, :, 0, 0]))
        cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        pooled = (f * cam[:, None]).sum(dim=(2, 3)) / cam.sum(dim=(1, 2))[:, None].clamp_min(1e-5)
        # unit-length pooled features (x RECAM_SCALE): features pooled on the strongest activations are
        # large, and raw logits on them made SGD at the recipe's head lr diverge on voc6 (loss 17 -> 67)
        logits = RECAM_SCALE * F.linear(F.normalize(pooled, dim=1), self.classifier_r.weight[:, :, 0, 0])
        return F.cross_entropy(logits, k_idx)

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        groups = super().param_groups(lr, head_lr_mult)
        groups[1]["params"] = groups[1]["params"] + [p for p in self.classifier_r.parameters() if p.requires_grad]
        return groups

    def head_config(self) -> dict:
        return {"head": "recam"}


def create_classifier(backbone: Backbone, num_classes: int, head: str = "gap", dropout: float = 0.0,
                      acol_threshold: float = 0.6, dilated_rates: tuple[int, ...] = (3, 6, 9)) -> Classifier:
    """The plain GAP classifier (``head='gap'``), ACoL's two-head one (``'acol'``), the multi-dilated one
    (``'multi_dilated'``) or ReCAM's (``'recam'``)."""
    if head == "gap":
        return Classifier(backbone, num_classes, dropout)
    if head == "acol":
        return ACoLClassifier(backbone, num_classes, dropout, acol_threshold)
    if head == "multi_dilated":
        return MultiDilatedClassifier(backbone, num_classes, dropout, tuple(dilated_rates))
    if head == "recam":
        return ReCAMClassifier(backbone, num_classes, dropout)
    raise ValueError(f"unknown classifier head '{head}' (valid: acol, gap, multi_dilated, recam)")
