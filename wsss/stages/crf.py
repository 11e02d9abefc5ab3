"""Stage 4, `wsss crf`: dense-CRF pseudo-masks from CAMs (plain or expanded), and `wsss eval masks`.

Output folder ``RUN/crf/``::

    <id>.png       palette PNG (VOC colours): 0 background, 1..K classes, 255 ignore
    stats.csv      id, classes, fg_share, ignore_share per image
    manifest.json  stage manifest (written last); config.yaml: the resolved crf section
    eval/          `wsss eval masks`: summary.json (mIoU on kept pixels, kept share, per-class IoU),
                   confusion.csv

Images are refined in parallel worker processes; every PNG is written atomically, so a killed run
leaves no half file and a re-run computes only the missing ones.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from wsss.camfile import load_cam
from wsss.config import CrfConfig, config_hash, config_to_dict, save_config
from wsss.crf import mask_stats, pseudo_mask
from wsss.data.dataset import Dataset
from wsss.errors import DataError, WsssError
from wsss.io import IGNORE, read_image, read_mask, write_json, write_palette_png, write_text
from wsss.log import progress
from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.metrics import confusion, iou_from_confusion

if TYPE_CHECKING:
    from wsss.config import Config
    from wsss.shard import Shard

log = logging.getLogger(__name__)

Job = tuple[str, str, str, str]  # (id, image path, cam path, output png path)


def crf_one(job: Job, cfg: CrfConfig, num_classes: int) -> dict:
    """Refine one image's CAMs into its pseudo-mask PNG; returns the mask's stats (with its id)."""
    sid, image_path, cam_path, out_path = job
    classes, cams = load_cam(cam_path, num_classes)
    image = read_image(image_path)
    if cams.shape[1:] != image.shape[:2]:
        raise DataError(f"CAM size {cams.shape[1]}x{cams.shape[2]} differs from its image's "
                        f"{image.shape[0]}x{image.shape[1]}", cam_path)
    mask = pseudo_mask(image, classes, cams, cfg)
    write_palette_png(out_path, mask)
    return {"id": sid, **mask_stats(mask)}


_WORKER: dict = {}


def _exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """Exit this worker once ``parent`` is gone. A SIGKILLed parent cannot stop its pool, and the
    workers would wait forever on a task queue whose write end they themselves hold."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="wsss-parent-watch", daemon=True).start()


def _init_worker(cfg: dict, num_classes: int, parent: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    _exit_with_parent(parent)
    _WORKER["cfg"], _WORKER["k"] = CrfConfig(**cfg), num_classes


def _worker(job: Job) -> dict:
    return crf_one(job, _WORKER["cfg"], _WORKER["k"])


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_crf(jobs: Sequence[Job], cfg: CrfConfig, num_classes: int, workers: int | None = None, desc: str = "crf") -> list[dict]:
    """Run :func:`crf_one` on every job, in ``workers`` processes (default ``cfg.workers``; 1 = in this
    process), with a progress bar. The first failure stops the run and is raised."""
    n = resolve_workers(cfg.workers if workers is None else workers)
    bar = progress(total=len(jobs), desc=desc, unit="img")
    out: list[dict] = []
    try:
        if n == 1 or len(jobs) <= 1:
            for job in jobs:
                out.append(crf_one(job, cfg, num_classes))
                bar.update(1)
            return out
        # spawn: workers must not inherit a parent that may hold torch/OpenMP thread pools
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(config_to_dict(cfg), num_classes, os.getpid())) as pool:
            futures = [pool.submit(_worker, job) for job in jobs]
            try:
                for f in as_completed(futures):
                    out.append(f.result())
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out
    finally:
        bar.close()


def crf_jobs(ds: Dataset, cam_dir: Path, out_dir: Path, skip_done: bool = True, split: Dataset | None = None) -> tuple[list[Job], int]:
    """Jobs for the images of ``ds`` without a PNG in ``out_dir`` and the number already done. Every
    image needs a CAM file, and every CAM file an image of ``split`` (default ``ds``)."""
    ids = {s.id for s in (split or ds)}
    missing = [s.id for s in ds if not (cam_dir / f"{s.id}.npz").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(ds)} images have no CAM file (first: {missing[0]}.npz)", cam_dir)
    orphans = sorted(p.stem for p in cam_dir.glob("*.npz") if p.stem not in ids)
    if orphans:
        raise DataError(f"{len(orphans)} CAM files have no image in split '{ds.split}' (first: {orphans[0]}.npz)", cam_dir)
    jobs, done = [], 0
    for s in ds:
        png = out_dir / f"{s.id}.png"
        if skip_done and png.is_file():
            done += 1
            continue
        jobs.append((s.id, str(s.image), str(cam_dir / f"{s.id}.npz"), str(png)))
    return jobs, done


def write_stats(out_dir: Path, ids: Iterable[str]) -> dict[str, float]:
    """``stats.csv`` for the PNGs of ``ids`` (read back, so resumed runs are covered); returns means."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "classes", "fg_share", "ignore_share"])
    fg, ign = [], []
    for sid in ids:
        st = mask_stats(read_mask(out_dir / f"{sid}.png"))
        w.writerow([sid, " ".join(map(str, st["classes"])), f"{st['fg_share']:.4f}", f"{st['ignore_share']:.4f}"])
        fg.append(st["fg_share"])
        ign.append(st["ignore_share"])
    write_text(out_dir / "stats.csv", buf.getvalue())
    return {"mean_fg_share": float(np.mean(fg)) if fg else 0.0, "mean_ignore_share": float(np.mean(ign)) if ign else 0.0}


def cam_source(cfg: "Config", run_dir: Path) -> str:
    """Which CAM stage folder the CRF reads: ``crf.source``, or for ``auto`` the expanded maps when the
    expand stage is enabled and finished, else the plain ones."""
    if cfg.crf.source != "auto":
        return cfg.crf.source
    return "expand" if cfg.expand.enabled and read_manifest(run_dir / "expand") is not None else "cam"


def run_crf_stage(cfg: "Config", run_dir: str | Path, force: bool = False, workers: int | None = None,
                  shard: "Shard | None" = None) -> StageOutcome:
    """Pipeline entry: pseudo-masks of ``cam.split`` from ``RUN/cam`` or ``RUN/expand`` into ``RUN/crf/``;
    with ``shard`` only that shard's images (see :mod:`wsss.shard`)."""
    from wsss.shard import check_shards, shard_ids, write_shard_record
    from wsss.stages.data import open_split

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "crf"
    source = cam_source(cfg, run_dir)
    src_man = read_manifest(run_dir / source)
    if src_man is None:
        cmd = "wsss cam" if source == "cam" else "wsss expand"
        raise WsssError(f"no finished {source} stage in this run directory; run `{cmd} CONFIG` first", run_dir)
    # worker count changes speed, not results, so it is not part of the key
    section = {k: v for k, v in config_to_dict(cfg.crf).items() if k not in ("workers", "sweep", "sweep_images", "sweep_min_kept")}
    chash = config_hash(section)
    inputs = {source: src_man["key"]}
    done = finished_outcome(out, "crf", chash, inputs, force, required=("stats.csv",))
    if done is not None:
        return done
    key = stage_key("crf", chash, inputs)
    prepare_output_folder(out, key, force, "*.png", "shards")
    save_config(cfg.crf, out / "config.yaml")
    ds = open_split(run_dir, cfg.cam.split)
    n_workers = resolve_workers(cfg.crf.workers if workers is None else workers)
    if shard is not None:
        sub = ds.subset(shard_ids([s.id for s in ds], shard))
        jobs, n_done = crf_jobs(sub, run_dir / source, out, split=ds)
        run_crf(jobs, cfg.crf, ds.num_classes, n_workers)
        write_shard_record(out, "crf", key, shard, [s.id for s in sub])
        log.info("crf: shard %d/%d: %d images (%d computed) -> %s", *shard, len(sub), len(jobs), out)
        return StageOutcome({"stage": "crf", "shard": list(shard), "outputs": {"images": len(sub), "computed": len(jobs)}}, skipped=False)
    n_shards = check_shards(out, key, [s.id for s in ds])
    jobs, n_done = crf_jobs(ds, run_dir / source, out)
    if n_done:
        log.info("crf: %d of %d images already done, resuming", n_done, len(ds))
    t0 = time.perf_counter()
    run_crf(jobs, cfg.crf, ds.num_classes, n_workers)
    secs = time.perf_counter() - t0
    stats = write_stats(out, [s.id for s in ds])
    outputs = {"images": len(ds), "computed": len(jobs), "reused": n_done, "source": source, "workers": n_workers, "shards": n_shards,
               "seconds_per_image": round(secs / len(jobs), 4) if jobs else None, **{k: round(v, 4) for k, v in stats.items()}}
    man = write_manifest(out, "crf", section, chash, inputs, outputs, started)
    log.info("crf: %d images (%d computed, %d reused) from %s, %s mode, %d workers; foreground %.1f%%, ignored %.1f%% -> %s",
             len(ds), len(jobs), n_done, source, cfg.crf.mode, n_workers, 100 * stats["mean_fg_share"],
             100 * stats["mean_ignore_share"], out)
    return StageOutcome(man, skipped=False)


# --------------------------------------------------------------------------------------------------
# evaluation (reads ground truth: never used to make masks)


def evaluate_masks(mask_dir: str | Path, ds: Dataset, ids: Sequence[str] | None = None) -> dict:
    """Score pseudo-masks ``<id>.png`` against ground truth on the pixels both keep (neither is 255).

    Returns mIoU (%), kept share (% of ground-truth-valid pixels the masks label), per-class IoU and
    the confusion matrix (rows = ground truth)."""
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
    valid = kept = 0
    for sid in progress(ids, desc="eval masks", unit="img"):
        gt = ds.read_mask(index[sid])
        pred = read_mask(mask_dir / f"{sid}.png", num_classes=k)
        if pred.shape != gt.shape:
            raise DataError(f"mask size {pred.shape} differs from the ground truth's {gt.shape}", mask_dir / f"{sid}.png")
        g = gt != IGNORE
        valid += int(g.sum())
        kept += int((g & (pred != IGNORE)).sum())
        cm += confusion(gt, pred, k)
    iou = iou_from_confusion(cm)
    return {
        "images": len(ids),
        "mIoU": round(100 * float(np.nanmean(iou)), 2),
        "kept_share": round(100 * kept / max(valid, 1), 2),
        "per_class_iou": {c: (None if v != v else round(100 * float(v), 2)) for c, v in zip(ds.classes, iou)},
        "confusion": cm.tolist(),
    }


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


# --------------------------------------------------------------------------------------------------
# parameter sweep on a labelled subset


def sweep_crf(cfg: "Config", run_dir: str | Path, n_images: int | None = None, workers: int | None = None) -> dict:
    """Try every combination of ``cfg.crf.sweep`` on the first ``sweep_images`` images of the split
    (which needs ground truth), score each, and write ``RUN/crf_sweep/{sweep.csv,best.yaml}``.

    Best = highest mIoU among settings keeping at least ``sweep_min_kept`` of the pixels (else the
    setting keeping the most). ``best.yaml`` is a config snippet (a ``crf:`` section) to merge."""
    import shutil

    import yaml

    from wsss.stages.data import open_split

    run_dir = Path(run_dir)
    c = cfg.crf
    source = cam_source(cfg, run_dir)
    if read_manifest(run_dir / source) is None:
        raise WsssError(f"no finished {source} stage in this run directory to sweep on", run_dir)
    ds = open_split(run_dir, cfg.cam.split)
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks: a sweep needs a labelled subset", ds.root)
    sub = ds.subset([s.id for s in ds.samples[: n_images or c.sweep_images]])
    keys = list(c.sweep)
    combos = list(itertools.product(*(c.sweep[k] for k in keys)))
    out = run_dir / "crf_sweep"
    rows = []
    for n, values in enumerate(combos, 1):
        trial = c.model_copy(update=dict(zip(keys, values)))
        trial = CrfConfig(**config_to_dict(trial))  # validate the combination
        folder = out / f"trial_{n:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        jobs, _ = crf_jobs(sub, run_dir / source, folder, skip_done=False, split=ds)
        folder.mkdir(parents=True)
        run_crf(jobs, trial, ds.num_classes, workers, desc=f"sweep {n}/{len(combos)}")
        res = evaluate_masks(folder, sub)
        shutil.rmtree(folder)
        rows.append({**dict(zip(keys, values)), "mIoU": res["mIoU"], "kept_share": res["kept_share"]})
        log.info("sweep %d/%d %s: mIoU %.1f, kept %.1f%%", n, len(combos), dict(zip(keys, values)), res["mIoU"], res["kept_share"])
    ok = [r for r in rows if r["kept_share"] >= 100 * c.sweep_min_kept]
    best = max(ok, key=lambda r: r["mIoU"]) if ok else max(rows, key=lambda r: r["kept_share"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, "mIoU", "kept_share"])
    w.writeheader()
    w.writerows(rows)
    write_text(out / "sweep.csv", buf.getvalue())
    snippet = {"crf": {k: best[k] for k in keys}}
    header = (f"# wsss crf --sweep on {len(sub)} {ds.split} images ({source}, {c.mode} mode): mIoU {best['mIoU']:.1f} "
              f"with {best['kept_share']:.1f}% kept{'' if ok else ' (no setting kept the required share)'}\n")
    write_text(out / "best.yaml", header + yaml.safe_dump(snippet, sort_keys=False))
    return {"rows": rows, "best": best, "met_min_kept": bool(ok), "images": len(sub), "out": str(out)}
