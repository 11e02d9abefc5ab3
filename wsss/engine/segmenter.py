"""Segmenter training: the (image, mask) dataset over pseudo-masks or ground truth, the loss that ignores
255, and :func:`train_segmenter` on the engine's :func:`~wsss.engine.core.fit`.

Augmentation: resize the long side to ``resize_long``, random scale, flip, optional colour jitter, crop
``crop_size`` (image padded with its mean, mask with 255). The augmentation of sample ``i`` in epoch
``e`` is drawn from an RNG seeded by ``(seed, e, i)``, the shuffle from ``(seed, e)``, and torch's RNG
(dropout) is saved in the checkpoint, so a run resumed at an epoch boundary ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import TrainSegConfig
from wsss.data.dataset import Dataset
from wsss.data.presets import train_transform
from wsss.data.transforms import to_tensor
from wsss.engine.core import (barrier, fit, is_main, make_optimizer, memory_layout, rank_batches, save_checkpoint, set_train_mode,
                              start_training)
from wsss.errors import DataError
from wsss.io import IGNORE, read_mask
from wsss.models.checkpoint import build_segmenter

log = logging.getLogger(__name__)

MaskSource = Callable[[int], np.ndarray]


def pseudo_mask_source(ds: Dataset, mask_dir: str | Path) -> MaskSource:
    """Masks ``<mask_dir>/<id>.png`` for the images of ``ds`` (all must exist; checked now)."""
    mask_dir = Path(mask_dir)
    missing = [s.id for s in ds if not (mask_dir / f"{s.id}.png").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(ds)} training images have no pseudo-mask (first: {missing[0]}.png); "
                        f"run `wsss crf CONFIG` first", mask_dir)
    return lambda i: read_mask(mask_dir / f"{ds[i].id}.png", num_classes=len(ds.classes))


def gt_mask_source(ds: Dataset) -> MaskSource:
    """The ground-truth masks of ``ds`` (the fully-supervised reference only)."""
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks (train_seg.masks=gt needs them)", ds.root)
    return ds.read_mask


class SegDataset(torch.utils.data.Dataset):
    """``(image (3, S, S) float, mask (S, S) int64)`` pairs; the mask source checks the ids (< K or 255)."""

    def __init__(self, ds: Dataset, masks: MaskSource, transform, mean, std, seed: int = 0) -> None:
        self.ds, self.masks, self.transform, self.mean, self.std, self.seed = ds, masks, transform, mean, std, seed
        self.epoch = 0
        self.num_classes = len(ds.classes)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, mask = self.ds.read_image(i), self.masks(i)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match its image "
                            f"{image.shape[1]}x{image.shape[0]}", self.ds[i].image)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, mask = self.transform(image, mask, rng)
        return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, drop: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``logits (B, K, H, W)`` against ``target (B, H, W)``, averaged over the pixels
    that are not 255; exactly 0 (with a gradient) when every pixel is ignored (torch's mean gives NaN).

    ``drop`` > 0 tolerates label noise (loss truncation): within each class, the ``drop`` share of the
    batch's pixels labelled with it that have the largest losses are left out, since wrong pseudo-labels
    are the ones the network cannot fit. Per class, because a hard class's pixels all have large losses:
    truncating over the whole batch left out every "person" pixel on voc6 (docs/quality.md)."""
    if drop <= 0:
        total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
        return total / (target != IGNORE).sum().clamp(min=1)
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    kept_sum, kept_n = per_pixel.sum() * 0.0, 0
    for c in torch.unique(target[target != IGNORE]).tolist():
        losses = per_pixel[target == c]
        keep = max(1, int(losses.numel() * (1.0 - drop)))
        kept_sum = kept_sum + torch.topk(losses, keep, largest=False, sorted=False).values.sum()
        kept_n += keep
    return kept_sum / max(kept_n, 1)



def train_segmenter(cfg: TrainSegConfig, train_ds: Dataset, masks: MaskSource, out_dir: str | Path,
                    val_ds: Dataset | None = None, seed: int = 0, resume: bool = True) -> dict[str, Any]:
    """Train on ``train_ds`` with ``masks(i) -> (H, W) uint8`` into ``out_dir`` (``segmenter.pt``,
    ``checkpoint.pt`` every epoch, ``log.csv``, ``config.yaml``).

    With ``resume`` an existing ``checkpoint.pt`` is continued from its last finished epoch (its config
    must match). Returns ``{"epochs", "iterations", "final", "history"}``."""
    from wsss.evaluation.seg import evaluate_segmenter

    out_dir = Path(out_dir)
    device = start_training(cfg, out_dir, seed)
    model = build_segmenter(cfg, len(train_ds.classes))
    layout = memory_layout(model.prefers_channels_last if cfg.channels_last is None else cfg.channels_last)
    model = model.to(device, memory_format=layout)

    def train_mode() -> None:
        set_train_mode(model, model.backbone, model.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)

    train_mode()  # frozen parameters are settled before the optimiser and DistributedDataParallel see the model
    opt = make_optimizer(model.param_groups(cfg.lr, cfg.head_lr_mult), cfg)
    fill = tuple(int(round(255 * m)) for m in model.mean)
    data = SegDataset(train_ds, masks, train_transform(cfg, fill), model.mean, model.std, seed)
    drop_last = len(data) > cfg.batch_size
    meta = {"arch": cfg.arch, "spec": model.spec(), "num_classes": len(train_ds.classes), "classes": list(train_ds.classes),
            "mean": list(model.mean), "std": list(model.std), "resize_long": cfg.resize_long, "masks": cfg.masks,
            "cooccurrence": train_ds.cooccurrence().tolist()}  # for predict.exclusive_below on any photo
    has_val = val_ds is not None and len(val_ds) > 0 and val_ds.has_masks

    def evaluate(epoch: int) -> dict[str, Any]:
        if not (has_val and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)):
            return {}
        model.eval()
        return {"val_mIoU": evaluate_segmenter(model, val_ds, cfg.resize_long, device, cfg.amp)["mIoU"]}

    summary = fit(model, opt, data, lambda m, x, y: seg_loss(m(x), y, cfg.loss_drop), cfg, out_dir, name="train-seg", section="train_seg",
                  device=device, seed=seed, resume=resume, free={"epochs", "device", "workers", "threads", "eval_every"},
                  meta=meta, layout=layout, amp=cfg.amp, warmup=cfg.warmup_iters, train_mode=train_mode, evaluate=evaluate,
                  steps_per_epoch=len(data) // cfg.batch_size if drop_last else math.ceil(len(data) / cfg.batch_size),
                  batches=lambda epoch: rank_batches(len(data), cfg.batch_size, seed * 100003 + epoch, drop_last))
    if is_main():
        save_checkpoint(out_dir / "segmenter.pt", {"model": model.state_dict(), "meta": meta})
    barrier()
    return summary
