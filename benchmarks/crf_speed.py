"""CRF stage speed, measured side by side in one run: worker scaling (1 vs N processes), seconds
per image for each mode, and the confidence mode's shared pairwise kernels against two separate CRFs
per image (outputs checked to agree), on a run directory's CAMs and images.

    python benchmarks/crf_speed.py --run runs/voc6_lite0 --n 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wsss.camfile import load_cam
from wsss.config import CrfConfig
from wsss.crf import refine, refine_many
from wsss.log import setup_logging
from wsss.crf.pool import crf_jobs, run_crf
from wsss.pipeline.runner import open_split


def timed_run(ds, full, cam_dir, cfg, workers, scratch: Path) -> float:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    jobs, _ = crf_jobs(ds, cam_dir, folder, skip_done=False, split=full)
    t = time.perf_counter()
    run_crf(jobs, cfg, ds.num_classes, workers)
    secs = time.perf_counter() - t
    shutil.rmtree(folder)
    return secs


def kernel_sharing(ds, cam_dir: Path, cfg: CrfConfig, repeats: int) -> tuple[float, float]:
    """Best seconds for both confidence passes of every image: two separate CRFs vs one CRF whose
    pairwise kernels serve both passes (one process; images and maps read beforehand)."""
    data = [(ds.read_image(i), load_cam(cam_dir / f"{s.id}.npz", ds.num_classes)[1]) for i, s in enumerate(ds)]
    bgs = [cfg.fg_threshold, cfg.low_threshold]
    separate, shared = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a = [[refine(im, cams, bg, cfg) for bg in bgs] for im, cams in data]
        separate.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = [refine_many(im, cams, bgs, cfg) for im, cams in data]
        shared.append(time.perf_counter() - t)
        if not all((x == y).all() for pa, pb in zip(a, b) for x, y in zip(pa, pb)):
            raise AssertionError("shared kernels changed the CRF labels")
    return min(separate), min(shared)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="run directory with data/ and cam/ (or expand/)")
    ap.add_argument("--source", default="cam", help="CAM folder inside the run directory")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=40, help="images")
    ap.add_argument("--workers", type=int, default=2, help="the multi-process count compared with 1 worker")
    ap.add_argument("--repeats", type=int, default=2, help="alternate 1 and N workers this many times, keep the best")
    args = ap.parse_args()
    setup_logging(-1)
    full = open_split(args.run, args.split)
    ds = full.subset([s.id for s in full.samples[: args.n]])
    sizes = [ds.read_image(i).shape[:2] for i in range(len(ds))]
    scratch = Path(tempfile.mkdtemp(prefix="wsss_crf_bench_"))
    cam_dir = args.run / args.source
    res: dict = {"images": len(ds), "mean_size": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))]}
    try:
        conf = CrfConfig(mode="confidence")
        prob = CrfConfig(mode="probability")
        timed_run(ds.subset([ds[0].id]), full, cam_dir, conf, 1, scratch)  # warm-up (imports, page cache)
        t1, tn = [], []
        for _ in range(args.repeats):
            t1.append(timed_run(ds, full, cam_dir, conf, 1, scratch))
            tn.append(timed_run(ds, full, cam_dir, conf, args.workers, scratch))
        t_prob = min(timed_run(ds, full, cam_dir, prob, 1, scratch) for _ in range(args.repeats))
        t_sep, t_shared = kernel_sharing(ds, cam_dir, conf, args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    res.update({
        "workers": args.workers,
        "confidence_img_per_s_1_worker": len(ds) / min(t1),
        f"confidence_img_per_s_{args.workers}_workers": len(ds) / min(tn),
        "worker_speedup": min(t1) / min(tn),
        "seconds_per_image_confidence": min(t1) / len(ds),
        "seconds_per_image_probability": t_prob / len(ds),
        "confidence_shared_kernels_vs_separate_time_ratio": t_shared / t_sep,
    })
    print(json.dumps(res, indent=2))
    print(f"{len(ds)} images of ~{res['mean_size'][0]:.0f}x{res['mean_size'][1]:.0f}: {args.workers} workers "
          f"{res['worker_speedup']:.2f}x the images/s of 1 worker; one process: confidence mode "
          f"{res['seconds_per_image_confidence']:.3f} s/img, probability mode {res['seconds_per_image_probability']:.3f} s/img; "
          f"confidence passes sharing their kernels take {res['confidence_shared_kernels_vs_separate_time_ratio']:.2f}x the "
          f"time of two separate CRFs (same labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
