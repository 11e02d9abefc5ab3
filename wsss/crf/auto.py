"""CRF thresholds without ground truth: chosen from the CAM values of the training images alone.

A user's own photos have no masks to sweep thresholds on. The maxima of an image's labelled-class maps
form, over many images, a mix of background-like values (near 0), uncertain ones and object-like ones
(near 1). Two-level Otsu (the split into three classes that maximises the between-class variance)
places ``low_threshold`` between background and uncertain values and ``fg_threshold`` between
uncertain and object values: the confidence-mode CRF labels the first as background, the last as
the object and leaves the middle to the CRF and the ignore label. Only CAM files are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from wsss.camfile import load_cam

BINS = 256


def multi_otsu(hist: np.ndarray) -> tuple[int, int]:
    """The two cut bins ``(t1, t2)``, ``t1 < t2``, that split a histogram ``(n,)`` into the three classes
    ``[0, t1)``, ``[t1, t2)``, ``[t2, n)`` with the largest between-class variance."""
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    idx = np.arange(len(p), dtype=np.float64)
    w = np.concatenate([[0.0], np.cumsum(p)])  # w[i] = mass of bins < i
    m = np.concatenate([[0.0], np.cumsum(p * idx)])
    mean = m[-1]
    best, cut = -1.0, (1, 2)
    n = len(p)
    for t1 in range(1, n - 1):
        w0, m0 = w[t1], m[t1]
        w1 = w[t1 + 1 : n] - w0  # middle class for every t2 > t1
        m1 = m[t1 + 1 : n] - m0
        w2, m2 = 1.0 - w0 - w1, mean - m0 - m1
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(w0 > 0, m0**2 / w0, 0) + np.where(w1 > 0, m1**2 / w1, 0) + np.where(w2 > 0, m2**2 / w2, 0)
        j = int(np.argmax(var))
        if var[j] > best:
            best, cut = float(var[j]), (t1, t1 + 1 + j)
    return cut


def auto_thresholds(cam_files: Sequence[Path], num_classes: int, n_images: int = 200) -> dict[str, float]:
    """``{"fg_threshold", "low_threshold", "images"}`` from the per-pixel maxima of the labelled-class maps
    of up to ``n_images`` of ``cam_files`` (evenly spread over the list, so the choice is deterministic)."""
    files = list(cam_files)
    if not files:
        raise ValueError("no CAM files to choose thresholds from")
    pick = np.unique(np.linspace(0, len(files) - 1, min(n_images, len(files))).round().astype(int))
    hist = np.zeros(BINS, np.int64)
    for i in pick:
        classes, cam = load_cam(files[i], num_classes)
        if len(classes):
            hist += np.bincount(np.minimum((cam.max(0) * BINS).astype(np.int64), BINS - 1).ravel(), minlength=BINS)
    t1, t2 = multi_otsu(hist)
    return {"fg_threshold": round(t2 / BINS, 4), "low_threshold": round(t1 / BINS, 4), "images": int(len(pick))}
