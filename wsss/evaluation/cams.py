"""Scoring CAMs against ground truth: the background-threshold sweep over a folder of maps and its report (evaluation only)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from wsss.camfile import load_cam
from wsss.errors import DataError
from wsss.io import write_json, write_text
from wsss.log import progress
from wsss.evaluation.metrics import foreground_precision_recall, iou_from_confusion, miou, per_class_percent

if TYPE_CHECKING:
    from wsss.data.dataset import Dataset


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
    ``num_classes`` counts background. A pixel is labelled with its arg-max class where that score is
    strictly above the threshold. One histogram per image serves every threshold.
    """
    ths = np.asarray(sorted(float(t) for t in thresholds))
    n_t, nc = len(ths), num_classes
    counts = np.zeros((n_t + 1, nc, nc), np.int64)  # [number of thresholds below the score, gt, label]
    for gt, classes, cam in items:
        classes = np.asarray(classes, np.int64)
        if cam.shape[1:] != gt.shape:
            raise ValueError(f"cam size {cam.shape[1:]} differs from mask size {gt.shape}")
        keep = gt.ravel() != 255
        g = gt.ravel()[keep].astype(np.int64)
        if len(classes) == 0:
            lab = np.zeros_like(g)
            j = np.zeros_like(g)
        else:
            flat = cam.reshape(len(classes), -1)[:, keep]
            best = flat.argmax(0)
            score = np.take_along_axis(flat, best[None], 0)[0]
            lab = classes[best]
            j = np.searchsorted(ths, score, side="left")
        if (g >= nc).any():
            raise ValueError(f"ground truth has ids >= {nc}")
        counts += np.bincount((j * nc + g) * nc + lab, minlength=(n_t + 1) * nc * nc).reshape(n_t + 1, nc, nc)
    above = np.cumsum(counts[::-1], axis=0)[::-1]  # above[i] = sum over j >= i
    below = np.cumsum(counts, axis=0)              # below[i] = sum over j <= i
    cms = []
    for i in range(n_t):
        cm = above[i + 1].copy()                    # score > t_i: labelled with the arg-max class
        cm[:, 0] += below[i].sum(axis=1)            # otherwise background
        cms.append(cm)
    prs = [foreground_precision_recall(c) for c in cms]
    return SweepResult(ths.tolist(), [miou(c) for c in cms], [p for p, _ in prs], [r for _, r in prs],
                       [iou_from_confusion(c).tolist() for c in cms])


def plot_sweep(result: SweepResult, path, title: str = "") -> None:
    """PNG plot of mIoU, foreground precision and recall against the background threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsss.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(result.thresholds, [100 * v for v in result.miou], "o-", label="mIoU")
    ax.plot(result.thresholds, [100 * v for v in result.precision], "--", label="fg precision")
    ax.plot(result.thresholds, [100 * v for v in result.recall], ":", label="fg recall")
    ax.axvline(result.best_threshold, color="grey", lw=0.8)
    ax.annotate(f"best {100 * result.best_miou:.1f} @ {result.best_threshold:.2f}", (result.best_threshold, 100 * result.best_miou),
                textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("background threshold")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate_cam_folder(cam_dir: str | Path, ds: "Dataset", thresholds: Sequence[float]) -> SweepResult:
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
        "per_class_iou": per_class_percent(classes, result.per_class_iou[b]),
    }
    write_json(out_dir / "summary.json", summary)
    return summary

