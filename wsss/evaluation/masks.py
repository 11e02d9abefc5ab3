"""Scoring palette-PNG masks (pseudo-masks or predictions) against ground truth."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from wsss.data.dataset import Dataset
from wsss.errors import DataError
from wsss.evaluation.metrics import confusion, iou_from_confusion, per_class_percent
from wsss.io import IGNORE, read_mask, write_json, write_text
from wsss.log import progress


def mask_counts(gt: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """What one mask ``pred (H, W)`` adds to a score against ``gt (H, W)``: the confusion matrix
    ``(k, k)`` on the pixels both keep, the one with ignored (255) predictions as background, and the
    numbers of valid and kept ground-truth pixels. Sum them over images for :func:`mask_scores`."""
    g = gt != IGNORE
    return (confusion(gt, pred, k), confusion(gt, np.where(pred == IGNORE, 0, pred).astype(np.uint8), k),
            int(g.sum()), int((g & (pred != IGNORE)).sum()))


#: upper ends of the object-size bins of :func:`size_counts`: a class's share of an image's valid pixels
SIZE_BINS = (0.1, 0.2, 0.35, 0.5, 1.0)
SIZE_LABELS = ("<=10%", "10-20%", "20-35%", "35-50%", ">50%")


def size_counts(gt: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recall by object size for one mask: ``(found, total, objects)``, each ``(k, len(SIZE_BINS))``
    int64. For every foreground class in ``gt (H, W)``, its pixels (``total``) and those ``pred (H, W)``
    gives the same class (``found``; an ignored prediction is a miss) go to the bin of the class's share
    of the valid pixels; ``objects`` counts the (image, class) pairs. Row 0 (background) stays zero."""
    found = np.zeros((k, len(SIZE_BINS)), np.int64)
    total, objects = np.zeros_like(found), np.zeros_like(found)
    valid = gt != IGNORE
    g = gt[valid].astype(np.int64)
    pixels = np.bincount(g, minlength=k)[:k]
    hits = np.bincount(g[pred[valid] == gt[valid]], minlength=k)[:k]
    present = np.flatnonzero(pixels[1:]) + 1
    b = np.minimum(np.searchsorted(SIZE_BINS, pixels[present] / max(len(g), 1), side="left"), len(SIZE_BINS) - 1)
    found[present, b], total[present, b], objects[present, b] = hits[present], pixels[present], 1
    return found, total, objects


def _percent(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [None if d == 0 else round(100 * float(x) / float(d), 2) for x, d in zip(num, den)]


def error_breakdown(cm_bg: np.ndarray, found: np.ndarray, total: np.ndarray, objects: np.ndarray,
                    classes: Sequence[str]) -> dict:
    """Where masks lose, every pixel scored (ignored = background): per-class precision and recall (%)
    from ``cm_bg (k, k)``, and recall (%) by object size, all foreground classes together and per class,
    from summed :func:`size_counts`. None where a share has nothing to divide by."""
    tp = np.diag(cm_bg)
    return {
        "precision": dict(zip(classes, _percent(tp, cm_bg.sum(0)))),
        "recall": dict(zip(classes, _percent(tp, cm_bg.sum(1)))),
        "recall_by_size": dict(zip(SIZE_LABELS, _percent(found.sum(0), total.sum(0)))),
        "objects_by_size": dict(zip(SIZE_LABELS, objects.sum(0).tolist())),
        "recall_by_size_per_class": {c: dict(zip(SIZE_LABELS, _percent(found[i], total[i])))
                                     for i, c in enumerate(classes) if i > 0},
    }


def mask_scores(cm: np.ndarray, cm_bg: np.ndarray, valid: int, kept: int, classes: Sequence[str]) -> dict:
    """mIoU (%) on kept pixels, kept share (%), mIoU with ignored pixels as background, per-class IoU
    both ways and the confusion matrix (kept pixels), from summed :func:`mask_counts`."""
    iou, iou_bg = iou_from_confusion(cm), iou_from_confusion(cm_bg)
    return {
        "mIoU": round(100 * float(np.nanmean(iou)), 2),
        "kept_share": round(100 * kept / max(valid, 1), 2),
        "mIoU_ignored_as_bg": round(100 * float(np.nanmean(iou_bg)), 2),
        "per_class_iou": per_class_percent(classes, iou),
        "per_class_iou_ignored_as_bg": per_class_percent(classes, iou_bg),
        "confusion": cm.tolist(),
    }


def evaluate_masks(mask_dir: str | Path, ds: Dataset, ids: Sequence[str] | None = None) -> dict:
    """Score pseudo-masks ``<id>.png`` against ground truth on the pixels both keep (neither is 255).

    Returns mIoU (%), kept share (% of ground-truth-valid pixels the masks label), mIoU with every
    ignored (255) pixel counted as background (every pixel scored, as IRN/AMN tables report), per-class
    IoU, the confusion matrix (rows = ground truth) and, under ``"errors"``, :func:`error_breakdown`."""
    mask_dir = Path(mask_dir)
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks to evaluate against", ds.root)
    index = {s.id: i for i, s in enumerate(ds)}
    ids = list(index) if ids is None else list(ids)
    missing = [sid for sid in ids if not (mask_dir / f"{sid}.png").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(ids)} images have no mask (first: {missing[0]}.png)", mask_dir)
    k = len(ds.classes)
    cm = np.zeros((k, k), np.int64)
    cm_bg = np.zeros((k, k), np.int64)  # ignored pixels as background
    found = np.zeros((k, len(SIZE_BINS)), np.int64)
    total, objects = np.zeros_like(found), np.zeros_like(found)
    valid = kept = 0
    for sid in progress(ids, desc="eval masks", unit="img"):
        gt = ds.read_mask(index[sid])
        pred = read_mask(mask_dir / f"{sid}.png", num_classes=k)
        if pred.shape != gt.shape:
            raise DataError(f"mask size {pred.shape} differs from the ground truth's {gt.shape}", mask_dir / f"{sid}.png")
        c, c_bg, v, kp = mask_counts(gt, pred, k)
        cm += c
        cm_bg += c_bg
        valid += v
        kept += kp
        f, t, o = size_counts(gt, pred, k)
        found += f
        total += t
        objects += o
    return {"images": len(ids), **mask_scores(cm, cm_bg, valid, kept, ds.classes),
            "errors": error_breakdown(cm_bg, found, total, objects, ds.classes)}


def write_mask_report(result: dict, classes: Sequence[str], out_dir: str | Path) -> None:
    """``summary.json`` (without the matrix) and ``confusion.csv`` (rows = ground truth)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "summary.json", {k: v for k, v in result.items() if k != "confusion"})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["gt \\ pred", *classes])
    for name, row in zip(classes, result["confusion"]):
        w.writerow([name, *row])
    write_text(out_dir / "confusion.csv", buf.getvalue())

