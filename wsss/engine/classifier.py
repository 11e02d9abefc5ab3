"""Classifier training: the image-level-label dataset, the multi-label loss (with the hooks the expansion
methods use), scoring, and :func:`train_classifier` on the engine's :func:`~wsss.engine.core.fit`.

Reproducibility: the augmentation of sample ``i`` in epoch ``e`` is drawn from an RNG seeded by
``(seed, e, i)`` and the shuffling from ``(seed, e)``, so a run resumed at an epoch boundary
continues exactly as if it had never stopped, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import TrainClsConfig
from wsss.data.dataset import Dataset
from wsss.data.presets import eval_transform, train_transform
from wsss.data.transforms import to_tensor
from wsss.engine.core import (barrier, fit, is_main, load_checkpoint, make_optimizer, memory_layout, rank_batches,
                              save_checkpoint, set_train_mode, start_training)
from wsss.errors import WsssError
from wsss.evaluation.metrics import average_precision, f1_scores
from wsss.models.checkpoint import build_classifier, use_channels_last
from wsss.models.classifier import Classifier

log = logging.getLogger(__name__)


class ClsDataset(torch.utils.data.Dataset):
    """Image-level-label dataset for training: ``(image (3, S, S), labels (K,))``.

    ``erase`` maps image ids to boolean masks ``(H, W)`` at image resolution; those pixels are set to
    the normalisation mean (zero after normalising) after the augmentation, which moves the masks
    along with the image (nearest-neighbour, 255 padding = not erased).
    """

    def __init__(self, ds: Dataset, transform, mean, std, seed: int = 0,
                 erase: Mapping[str, np.ndarray] | None = None) -> None:
        self.ds, self.transform, self.mean, self.std, self.seed = ds, transform, mean, std, seed
        self.labels = ds.label_matrix()
        self.erase = erase or {}
        self.fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        erase = self.erase.get(self.ds[i].id)
        img, mask = self.transform(self.ds.read_image(i), None if erase is None else erase.astype(np.uint8), rng)
        if mask is not None:
            img = img.copy()
            img[mask == 1] = self.fill
        return to_tensor(img, self.mean, self.std), torch.from_numpy(self.labels[i])


class TrainHooks:
    """Extension points of :func:`train_classifier` used by the expansion methods (hide-and-seek, mixup):
    ``batch`` may change a batch ``x (B, 3, S, S)``, ``y (B, K)`` before the forward pass, ``regulariser``
    adds a loss term from that batch and its features ``(B, C, h, w)``. The base class changes nothing."""

    def batch(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def regulariser(self, model: Classifier, x: torch.Tensor, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None


def classification_loss(model: Classifier, x: torch.Tensor, y: torch.Tensor, hooks: TrainHooks | None = None) -> torch.Tensor:
    """Multi-label soft-margin loss (both heads for ACoL) plus the hooks' regularisers."""
    feats = model.forward_features(x)
    loss = sum(F.multilabel_soft_margin_loss(logits, y) for logits in model.training_logits(feats, y))
    if hooks is not None:
        extra = hooks.regulariser(model, x, feats, y)
        if extra is not None:
            loss = loss + extra
    return loss


@torch.no_grad()
def predict_scores(model: Classifier, ds: Dataset, cfg: TrainClsConfig, device: torch.device,
                   erase: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Sigmoid scores ``(N, K)`` of ``ds`` at the training resolution (with ``erase`` applied, as in
    :class:`ClsDataset`)."""
    model.eval()
    data = ClsDataset(ds, eval_transform(cfg), model.backbone.mean, model.backbone.std, erase=erase)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers)
    layout = memory_layout(use_channels_last(cfg.channels_last, model))
    out = [torch.sigmoid(model(x.to(device, memory_format=layout))).float().cpu() for x, _ in loader]
    return torch.cat(out).numpy()


def evaluate_classifier(model: Classifier, ds: Dataset, cfg: TrainClsConfig, device: torch.device) -> dict[str, float]:
    """mAP and F1 (macro, micro; threshold 0.5) on ``ds``."""
    scores = predict_scores(model, ds, cfg, device)
    targets = ds.label_matrix()
    ap = average_precision(scores, targets)
    f1_macro, f1_micro = f1_scores(scores, targets)
    return {"mAP": float(np.nanmean(ap)), "f1_macro": f1_macro, "f1_micro": f1_micro}



def train_classifier(cfg: TrainClsConfig, train_ds: Dataset, out_dir: str | Path, val_ds: Dataset | None = None,
                     seed: int = 0, resume: bool = False, *, init: str | Path | None = None,
                     head: Mapping[str, Any] | None = None, hooks: TrainHooks | None = None,
                     erase: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train the classifier into ``out_dir`` (``classifier.pt``, ``checkpoint.pt``, ``log.csv``,
    ``config.yaml``). Returns ``{"epochs", "iterations", "final", "history"}``.

    With ``resume=True`` an existing ``checkpoint.pt`` is continued from its last finished epoch.
    Fine-tuning (the expansion methods): ``init`` starts from a saved ``classifier.pt`` (a new head's
    weights stay freshly initialised), ``head`` picks the classifier head (see ``create_classifier``),
    ``hooks`` change batches and add loss terms, ``erase`` blanks regions of training images.
    """
    out_dir = Path(out_dir)
    device = start_training(cfg, out_dir, seed)
    model = build_classifier(cfg, train_ds.num_classes, head)
    if init is not None:
        start = load_checkpoint(init)
        missing, unexpected = model.load_state_dict(start.get("model", {}), strict=False)
        if unexpected or any(not k.startswith(model.extra_heads or ("\0",)) for k in missing):
            raise WsssError(f"cannot start from {init}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    layout = memory_layout(use_channels_last(cfg.channels_last, model))
    model = model.to(device, memory_format=layout)

    def train_mode() -> None:
        set_train_mode(model, model.backbone, model.backbone.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)

    train_mode()  # frozen parameters are settled before the optimiser and DistributedDataParallel see the model
    opt = make_optimizer(model.param_groups(cfg.lr, cfg.head_lr_mult), cfg)
    data = ClsDataset(train_ds, train_transform(cfg), model.backbone.mean, model.backbone.std, seed, erase)
    drop_last = len(data) > cfg.batch_size
    meta = {"backbone": cfg.backbone, "output_stride": model.backbone.output_stride, "num_classes": train_ds.num_classes,
            "classes": list(train_ds.classes), "mean": list(model.backbone.mean), "std": list(model.backbone.std),
            "head": model.head_config()}
    has_val = val_ds is not None and len(val_ds) > 0
    summary = fit(model, opt, data, lambda m, x, y: classification_loss(m, x, y, hooks), cfg, out_dir, name="train-cls",
                  section="train_cls", device=device, seed=seed, resume=resume, free={"epochs", "device", "workers", "threads"},
                  meta=meta, layout=layout, warmup=cfg.warmup_iters, train_mode=train_mode,
                  steps_per_epoch=len(data) // cfg.batch_size if drop_last else math.ceil(len(data) / cfg.batch_size),
                  batches=lambda epoch: rank_batches(len(data), cfg.batch_size, seed * 100003 + epoch, drop_last),
                  batch_hook=None if hooks is None else hooks.batch,
                  evaluate=(lambda epoch: {f"val_{k}": round(v, 4) for k, v in evaluate_classifier(model, val_ds, cfg, device).items()})
                  if has_val else None)
    if is_main():
        save_checkpoint(out_dir / "classifier.pt", {"model": model.state_dict(), "meta": meta})
    barrier()
    return summary
