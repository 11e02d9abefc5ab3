"""Pseudo-masks for a folder of CAM files: one job per image (CAMs + photo -> palette PNG), run in
worker processes, and the per-image statistics file. Every PNG is written atomically, so a killed run
leaves no half file and a re-run computes only the missing ones."""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from wsss.camfile import load_cam
from wsss.config import CrfConfig, config_to_dict
from wsss.crf.dense import mask_stats, pseudo_mask
from wsss.data.dataset import Dataset
from wsss.errors import DataError
from wsss.io import read_image, read_mask, write_palette_png, write_text
from wsss.log import progress

log = logging.getLogger(__name__)

#: crf settings that change speed or the sweep, not the masks (left out of a stage's key)
UNKEYED = ("workers", "sweep", "sweep_images", "sweep_min_kept", "sweep_score")

Job = tuple[str, str, str, str]  # (id, image path, cam path, output png path)


def crf_one(job: Job, cfg: CrfConfig, num_classes: int) -> dict:
    """Refine one image's CAMs into its pseudo-mask PNG; returns the mask's stats (with its id)."""
    sid, image_path, cam_path, out_path = job
    image = read_image(image_path)
    classes, cams = load_cam(cam_path, num_classes, size=image.shape[:2])
    h, w = image.shape[:2]
    if cfg.max_side is not None and max(h, w) > cfg.max_side:  # bounded memory: refine smaller, label the photo's pixels
        r = cfg.max_side / max(h, w)
        size = (max(1, round(w * r)), max(1, round(h * r)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        maps = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in cams]) if len(cams) else np.zeros((0, size[1], size[0]), np.float32)
        mask = cv2.resize(pseudo_mask(small, classes, np.clip(maps, 0, 1), cfg), (w, h), interpolation=cv2.INTER_NEAREST)
    else:
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


def empty_masks_warning(stats: dict[str, float], images: int) -> list[str]:
    """A warning when no pseudo-mask has a foreground pixel (the segmenter would learn background only)."""
    if images and stats["mean_fg_share"] == 0:
        return [f"all {images} pseudo-masks are background or ignore only: a segmenter trained on them learns nothing "
                "(lower crf.fg_threshold, or check the maps with `wsss eval cam` / `wsss inspect`)"]
    return []


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


def refine_folder(ds: Dataset, maps: Path, masks: Path, cfg: CrfConfig, name: str) -> tuple[dict[str, float], list[str]]:
    """A later stage's own CRF pass: the maps of ``ds`` in ``maps`` into ``masks/<id>.png`` (only those
    missing) + ``stats.csv``. Returns the mean statistics and the warnings (also logged under ``name``)."""
    masks.mkdir(parents=True, exist_ok=True)
    jobs, _ = crf_jobs(ds, maps, masks)
    run_crf(jobs, cfg, ds.num_classes, desc=f"{name}: crf")
    stats = write_stats(masks, [s.id for s in ds])
    warnings = empty_masks_warning(stats, len(ds))
    for w in warnings:
        log.warning("%s: %s", name, w)
    return stats, warnings
