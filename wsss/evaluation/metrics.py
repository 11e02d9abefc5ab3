"""Segmentation and classification metrics (numpy, no side effects)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from wsss.io import IGNORE


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 confusion matrix (rows = ground truth) over pixels where
    neither ``gt`` nor ``pred`` is 255. ``gt``/``pred``: same-shape integer arrays."""
    if gt.shape != pred.shape:
        raise ValueError(f"gt shape {gt.shape} != pred shape {pred.shape}")
    g = gt.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    keep = (g != IGNORE) & (p != IGNORE) & (g < num_classes)
    if (p[keep] >= num_classes).any():
        raise ValueError(f"prediction has ids >= {num_classes}")
    return np.bincount(g[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``(K,)``; NaN for classes absent from both ground truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def per_class_percent(classes: Sequence[str], iou: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """``{class: IoU in %, 2 decimals}`` from per-class IoU ``(K,)`` in [0, 1]; None where it is NaN."""
    return {c: (None if v != v else round(100 * float(v), 2)) for c, v in zip(classes, iou)}


def miou(cm: np.ndarray) -> float:
    """Mean IoU over classes present in ground truth or prediction, in [0, 1]."""
    return float(np.nanmean(iou_from_confusion(cm)))


def foreground_precision_recall(cm: np.ndarray) -> tuple[float, float]:
    """Precision and recall of 'any foreground' vs background (class 0) from a confusion matrix."""
    fg_pred = cm[:, 1:].sum()
    fg_gt = cm[1:, :].sum()
    tp = cm[1:, 1:].sum()
    return float(tp / fg_pred) if fg_pred else 0.0, float(tp / fg_gt) if fg_gt else 0.0


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision ``(K,)`` for ``(N, K)`` scores and {0,1} targets; NaN without positives."""
    n, k = scores.shape
    out = np.full(k, np.nan)
    for c in range(k):
        t = targets[:, c] > 0.5
        if not t.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = t[order]
        prec = np.cumsum(hits) / np.arange(1, n + 1)
        out[c] = float((prec * hits).sum() / hits.sum())
    return out


def f1_scores(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """(macro F1, micro F1) of ``scores >= threshold`` against {0,1} targets."""
    pred = scores >= threshold
    t = targets > 0.5
    tp = (pred & t).sum(0).astype(np.float64)
    fp = (pred & ~t).sum(0)
    fn = (~pred & t).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    return float(np.nanmean(per)), float(micro)
