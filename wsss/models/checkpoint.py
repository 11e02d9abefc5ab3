"""Model files: build a classifier or segmenter from a config section, and save / load them.

``classifier.pt`` and ``segmenter.pt`` hold ``{"model": state dict, "meta": {...}}``; the meta says how to
rebuild the network (backbone or arch + spec, classes, normalisation), so a file loads without its config.
Checkpoints are read with ``weights_only=True``: a model file is untrusted input and runs no code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from wsss.config import TrainClsConfig, TrainSegConfig
from wsss.errors import WsssError, brief
from wsss.io import atomic_path
from wsss.models.backbones import create_backbone
from wsss.models.classifier import Classifier, create_classifier
from wsss.models.segmenter import Segmenter, create_segmenter


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` through a temp file + rename: a killed run never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
            raise WsssError(f"cannot write the checkpoint ({brief(e)})", path) from e


def load_checkpoint(path: str | Path, hint: str = "") -> dict[str, Any]:
    """Load a checkpoint written by wsss (``weights_only=True``: no code is executed); ``hint`` is added
    to the error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise WsssError("checkpoint not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WsssError(f"cannot load checkpoint ({type(e).__name__}: {brief(e, 120)}){hint}", path) from None


def freeze_parameters(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)



def use_channels_last(setting: bool | None, model: Classifier) -> bool:
    """The configured layout, or the backbone's preference when unset."""
    return model.backbone.prefers_channels_last if setting is None else setting


def build_classifier(cfg: TrainClsConfig, num_classes: int, head: Mapping[str, Any] | None = None) -> Classifier:
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, output_stride=cfg.output_stride)
    model = create_classifier(backbone, num_classes, dropout=cfg.dropout, **(head or {}))
    if cfg.freeze_stem:
        freeze_parameters(backbone.stem_modules())
    return model


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved as ``classifier.pt``; returns ``(model in eval mode, meta)``."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj:
        raise WsssError("not a wsss classifier file (needs 'model' and 'meta')", path)
    meta = obj["meta"]
    backbone = create_backbone(meta["backbone"], pretrained=False, output_stride=meta["output_stride"])
    model = create_classifier(backbone, meta["num_classes"], **meta.get("head", {}))
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise WsssError(f"weights do not fit backbone '{meta['backbone']}' ({brief(e, 150)})", path) from None
    return model.to(device).eval(), meta



def build_segmenter(cfg: TrainSegConfig, num_classes: int, pretrained: bool | str | None = None) -> Segmenter:
    model = create_segmenter(cfg.arch, num_classes, pretrained=cfg.pretrained if pretrained is None else pretrained,
                             backbone=cfg.backbone, output_stride=cfg.output_stride, **cfg.head_options())
    if cfg.freeze_stem:
        freeze_parameters(model.stem_modules())
    return model


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild a segmenter saved as ``segmenter.pt`` (or a train-seg ``checkpoint.pt``): ``(model in eval
    mode, meta)``."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj or "arch" not in obj.get("meta", {}):
        raise WsssError("not a wsss segmenter file (needs 'model' and 'meta' with 'arch')", path)
    meta = obj["meta"]
    model = create_segmenter(meta["arch"], meta["num_classes"], pretrained=False, **meta["spec"])
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise WsssError(f"weights do not fit segmenter '{meta['arch']}' ({brief(e, 150)})", path) from None
    return model.to(device).eval(), meta

