"""Fail fast: everything a config names -- registry names, paths, constraints across sections -- is checked
before any stage runs, so a typo costs seconds, not the hours of the stages before the one that reads it."""

from __future__ import annotations

from pathlib import Path

from wsss.config import Config
from wsss.errors import ConfigError


def _registry_problem(registry, key: str, name: str) -> str | None:
    try:
        registry.get(name)
    except ConfigError as e:
        return f"config key '{key}': {e}"
    return None


def config_problems(cfg: Config) -> list[str]:
    """Every problem of ``cfg`` that pydantic's per-key validation cannot see, one line each."""
    from wsss.cam.methods import CAM_METHODS
    from wsss.expand.methods import EXPAND_METHODS
    from wsss.models import BACKBONES  # the package registers every backbone
    from wsss.models.segmenter import SEGMENTERS

    checks = [(BACKBONES, "train_cls.backbone", cfg.train_cls.backbone), (CAM_METHODS, "cam.method", cfg.cam.method),
              (SEGMENTERS, "train_seg.arch", cfg.train_seg.arch),
              *((EXPAND_METHODS, "expand.methods", m) for m in cfg.expand.methods)]
    if not cfg.train_seg.arch.startswith("tv_"):  # torchvision's segmenters bring their own backbone
        checks.append((BACKBONES, "train_seg.backbone", cfg.train_seg.backbone))
    problems = [p for registry, key, name in checks if (p := _registry_problem(registry, key, name)) is not None]
    if cfg.train_seg.arch in SEGMENTERS:  # head options the segmenter does not take (e.g. rates for unet)
        takes = getattr(SEGMENTERS.get(cfg.train_seg.arch), "options", None)
        keys = {"channels": "channels", "rates": "rates", "dropout": "head_dropout", "decoder_channels": "decoder_channels"}
        for opt in sorted(set(cfg.train_seg.head_options()) - (takes if takes is not None else set(keys))):
            problems.append(f"config key 'train_seg.{keys[opt]}': segmenter '{cfg.train_seg.arch}' has no such option")
    paths = [("data.root", cfg.data.root if cfg.data.source != "synth" else None), ("train_seg.mask_dir", cfg.train_seg.mask_dir),
             *((f"{s}.pretrained", getattr(cfg, s).pretrained) for s in ("train_cls", "train_seg"))]
    for key, value in paths:
        if isinstance(value, (str, Path)) and not isinstance(value, bool) and not Path(value).exists():
            problems.append(f"config key '{key}': {value} does not exist")
    if cfg.data.source == "coco" and cfg.data.root is not None and Path(cfg.data.root).is_dir():
        from wsss.data.coco import is_coco

        if not is_coco(cfg.data.root):
            problems.append(f"config key 'data.root': {cfg.data.root} is not a COCO folder (needs annotations/instances_<split>.json)")
    if cfg.crf.source == "expand" and not cfg.expand.enabled:
        problems.append("config key 'crf.source': 'expand' needs the expand stage (expand.enabled=true)")
    if cfg.train_seg.mask_dir is not None and cfg.train_seg.masks == "gt":
        problems.append("config keys 'train_seg.mask_dir' and 'train_seg.masks=gt' contradict each other (pick one)")
    return problems


def check_config(cfg: Config) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``cfg`` (see :func:`config_problems`)."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
