"""Scoring maps and masks against ground truth (evaluation only: never used by a training stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from wsss.metrics import confusion, foreground_precision_recall, iou_from_confusion, miou


def cams_to_mask(cam: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Label map ``(H, W)`` uint8 from max-normalised CAMs ``(k, H, W)`` of class ids ``classes`` ``(k,)``:
    the arg-max class where its score beats ``threshold``, else background (0)."""
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"cam must be (k, H, W) with k = len(classes) = {len(classes)}, got {cam.shape}")
    if len(classes) == 0:
        return np.zeros(cam.shape[1:], np.uint8)
    best = cam.argmax(0)
    score = np.take_along_axis(cam, best[None], 0)[0]
    out = np.asarray(classes, np.uint8)[best]
    out[score <= threshold] = 0
    return out


@dataclass
class SweepResult:
    thresholds: list[float]
    miou: list[float]
    precision: list[float]
    recall: list[float]
    per_class_iou: list[list[float]]

    @property
    def best_index(self) -> int:
        return int(np.nanargmax(self.miou))

    @property
    def best_threshold(self) -> float:
        return self.thresholds[self.best_index]

    @property
    def best_miou(self) -> float:
        return self.miou[self.best_index]

    def rows(self) -> list[dict]:
        return [{"threshold": t, "mIoU": m, "fg_precision": p, "fg_recall": r}
                for t, m, p, r in zip(self.thresholds, self.miou, self.precision, self.recall)]


def sweep_cam_thresholds(items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
                         thresholds: Sequence[float]) -> SweepResult:
    """mIoU (incl. background) and foreground precision/recall for each background threshold.

    ``items`` yields ``(gt (H, W) uint8, classes (k,), cam (k, H, W) float in [0, 1])``;
    ``num_classes`` counts background.
    """
    ths = [float(t) for t in thresholds]
    cms = np.zeros((len(ths), num_classes, num_classes), np.int64)
    for gt, classes, cam in items:
        classes = np.asarray(classes)
        if len(classes) == 0:
            for j in range(len(ths)):
                cms[j] += confusion(gt, np.zeros_like(gt), num_classes)
            continue
        best = cam.argmax(0)
        score = np.take_along_axis(cam, best[None], 0)[0]
        lab = classes.astype(np.int64)[best]
        for j, t in enumerate(ths):
            cms[j] += confusion(gt, np.where(score > t, lab, 0), num_classes)
    prs = [foreground_precision_recall(c) for c in cms]
    return SweepResult(ths, [miou(c) for c in cms], [p for p, _ in prs], [r for _, r in prs],
                       [iou_from_confusion(c).tolist() for c in cms])
