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
from typing import TYPE_CHECKING, Sequence

from wsss.data.dataset import Dataset
from wsss.errors import DataError
from wsss.evaluation import SweepResult, plot_sweep, sweep_cam_thresholds
from wsss.io import remove_temp_files, write_json, write_text
from wsss.log import progress
from wsss.camfile import load_cam

if TYPE_CHECKING:
    from wsss.config import Config
    from wsss.manifest import StageOutcome

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


def run_eval_stage(cfg: "Config", run_dir: str | Path, force: bool = False) -> "StageOutcome":
    """Pipeline entry: score every finished map/mask stage of the run that has ground truth to compare
    with; writes ``RUN/eval/summary.json`` (one entry per scored stage) and each stage's ``eval/``."""
    import time

    from wsss.config import config_hash, config_to_dict
    from wsss.manifest import StageOutcome, finished_outcome, read_manifest, write_manifest
    from wsss.stages.crf import evaluate_masks, write_mask_report
    from wsss.stages.data import open_split

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "eval"
    names = ("cam", "expand") if cfg.expand.enabled else ("cam",)
    scored = {name: man for name in names if (man := read_manifest(run_dir / name)) is not None}
    mask_folders = {"crf": run_dir / "crf", "affinity": run_dir / "affinity" / "masks"}
    mask_stages = {name: man for name in (("crf", "affinity") if cfg.affinity.enabled else ("crf",))
                   if (man := read_manifest(run_dir / name)) is not None}
    from wsss.stages.predict import predict_folder

    pred_dir = predict_folder(cfg, run_dir)
    pred_man = read_manifest(pred_dir)
    inputs = {name: man["key"] for name, man in {**scored, **mask_stages}.items()}
    if pred_man is not None:
        inputs["predict"] = pred_man["key"]
    section = config_to_dict(cfg.eval)
    chash = config_hash(section)
    done = finished_outcome(out, "eval", chash, inputs, force)
    if done is not None:
        return done
    for folder in (out, pred_dir / "eval", *(run_dir / name / "eval" for name in (*scored, *mask_stages))):
        remove_temp_files(folder)  # left by a killed eval
    results = {}
    split = cfg.cam.split
    ds = open_split(run_dir, split) if scored or mask_stages else None
    if ds is not None and not ds.has_masks:
        log.warning("eval: split '%s' has no ground-truth masks; %s not scored", split, ", ".join([*scored, *mask_stages]))
        scored, mask_stages = {}, {}
    for name in scored:
        res = evaluate_cam_folder(run_dir / name, ds, cfg.eval.thresholds)
        results[name] = write_cam_report(res, ds.classes, run_dir / name / "eval", title=f"{name} on {split}")
        r = results[name]
        log.info("eval %s: mIoU %.1f at threshold %.2f (fg precision %.1f, recall %.1f) on %d %s images", name,
                 r["mIoU"], r["best_threshold"], r["fg_precision"], r["fg_recall"], len(ds), split)
    for name in mask_stages:
        res = evaluate_masks(mask_folders[name], ds)
        write_mask_report(res, ds.classes, run_dir / name / "eval")
        results[name] = {k: v for k, v in res.items() if k != "confusion"}
        log.info("eval %s: mIoU %.1f on kept pixels, %.1f%% kept, on %d %s images", name, res["mIoU"], res["kept_share"], len(ds), split)
    if pred_man is not None:
        pds = open_split(run_dir, cfg.predict.split)
        if pds.has_masks:
            res = evaluate_masks(pred_dir, pds)
            write_mask_report(res, pds.classes, pred_dir / "eval")
            results["seg"] = {k: v for k, v in res.items() if k not in ("confusion", "kept_share")} | {"split": cfg.predict.split}
            log.info("eval seg: mIoU %.1f on %d %s images", res["mIoU"], len(pds), cfg.predict.split)
        else:
            log.warning("eval: split '%s' has no ground-truth masks; segmenter predictions not scored", cfg.predict.split)
    write_json(out / "summary.json", results)
    brief = {name: {k: r[k] for k in ("mIoU", "best_threshold", "kept_share") if k in r} for name, r in results.items()}
    man = write_manifest(out, "eval", section, chash, inputs, brief, started)
    return StageOutcome(man, skipped=False)
