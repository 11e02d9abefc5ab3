"""Scoring a segmenter in memory (single scale) against ground-truth masks: the per-epoch val mIoU."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from wsss.data.dataset import Dataset
from wsss.evaluation.metrics import confusion, iou_from_confusion, per_class_percent
from wsss.inference import predict_probs
from wsss.log import progress
from wsss.models.segmenter import Segmenter


def evaluate_segmenter(model: Segmenter, ds: Dataset, resize_long: int | None, device: torch.device,
                       amp: str = "none", desc: str = "val") -> dict[str, Any]:
    """Single-scale mIoU (%) of ``model`` on ``ds`` (which has masks), at full mask resolution."""
    k = len(ds.classes)
    cm = np.zeros((k, k), np.int64)
    for i in progress(range(len(ds)), desc=desc, unit="img", leave=False):
        probs = predict_probs(model, [ds.read_image(i)], scales=[1.0], flip=False, resize_long=resize_long,
                              device=device, amp=amp)[0]
        cm += confusion(ds.read_mask(i), probs.argmax(0).astype(np.uint8), k)
    iou = iou_from_confusion(cm)
    return {"mIoU": round(100 * float(np.nanmean(iou)), 2),
            "per_class_iou": per_class_percent(ds.classes, iou)}

