"""Transform recipes (presets) of the training stages, built from a training config section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsss.data.transforms import ColorJitter, Compose, HFlip, RandomCrop, RandomScale, Resize

if TYPE_CHECKING:
    from wsss.config import TrainClsConfig, TrainCommon


def train_transform(cfg: "TrainCommon", fill: tuple[int, int, int] | None = None) -> Compose:
    """The training augmentation of both training stages: resize the long side, random scale, flip,
    colour jitter, random crop (image padded with ``fill``, default the ImageNet mean; mask with 255)."""
    ts = []
    if cfg.resize_long:
        ts.append(Resize(long_side=cfg.resize_long))
    lo, hi = cfg.scale_range
    if (lo, hi) != (1.0, 1.0):
        ts.append(RandomScale(lo, hi))
    if cfg.hflip:
        ts.append(HFlip(0.5))
    if cfg.color_jitter:
        ts.append(ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ts.append(RandomCrop(cfg.crop_size) if fill is None else RandomCrop(cfg.crop_size, fill))
    return Compose(ts)


def eval_transform(cfg: TrainClsConfig) -> Compose:
    return Compose([Resize(size=(cfg.crop_size, cfg.crop_size))])

