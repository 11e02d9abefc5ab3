"""`wsss eval cam`: score a folder of CAM ``.npz`` files against ground-truth masks.

Writes into ``<cam folder>/eval/``: ``sweep.csv`` (mIoU, foreground precision and recall per background
threshold), ``sweep.png`` (the same as a plot), ``summary.json`` (best threshold, its mIoU, per-class IoU).
Evaluation is the only place ground-truth masks are read.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Sequence

from wsss.data.dataset import Dataset
from wsss.errors import DataError
from wsss.evaluation import SweepResult, plot_sweep, sweep_cam_thresholds
from wsss.io import write_json, write_text
from wsss.log import progress
from wsss.stages.cam import load_cam

log = logging.getLogger(__name__)


def evaluate_cam_folder(cam_dir: str | Path, ds: Dataset, thresholds: Sequence[float]) -> SweepResult:
    """Threshold sweep of the CAMs in ``cam_dir`` over every image of ``ds`` (which needs masks)."""
    cam_dir = Path(cam_dir)
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks to evaluate against", ds.root)
    missing = [s.id for s in ds if not (cam_dir / f"{s.id}.npz").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(ds)} images have no CAM file (first: {missing[0]}.npz)", cam_dir)

    def items():
        for i, s in enumerate(progress(ds.samples, desc="eval cam", unit="img")):
            classes, cam = load_cam(cam_dir / f"{s.id}.npz", ds.num_classes)
            gt = ds.read_mask(i)
            if cam.shape[1:] != gt.shape:
                raise DataError(f"CAM size {cam.shape[1:]} differs from the mask size {gt.shape}", cam_dir / f"{s.id}.npz")
            yield gt, classes, cam

    return sweep_cam_thresholds(items(), len(ds.classes), thresholds)


def write_cam_report(result: SweepResult, classes: list[str], out_dir: str | Path, title: str = "") -> dict:
    """Write sweep.csv, sweep.png and summary.json into ``out_dir``; returns the summary."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["threshold", "mIoU", "fg_precision", "fg_recall"])
    w.writeheader()
    for row in result.rows():
        w.writerow({k: round(v, 4) for k, v in row.items()})
    write_text(out_dir / "sweep.csv", buf.getvalue())
    plot_sweep(result, out_dir / "sweep.png", title)
    b = result.best_index
    summary = {
        "best_threshold": result.best_threshold,
        "mIoU": round(100 * result.best_miou, 2),
        "fg_precision": round(100 * result.precision[b], 2),
        "fg_recall": round(100 * result.recall[b], 2),
        "per_class_iou": {c: (None if v != v else round(100 * v, 2)) for c, v in zip(classes, result.per_class_iou[b])},
    }
    write_json(out_dir / "summary.json", summary)
    return summary
