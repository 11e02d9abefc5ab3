"""Per-class multipliers on a run's maps before the confidence-mode CRF: a greedy search on the first
``--select`` labelled photos (one class at a time, keeping a weight when it raises the every-pixel mIoU
by more than 0.1), then both settings scored on the split's other photos, which the search never saw.

    python benchmarks/class_weights.py --run runs/r1 --maps affinity --fg 0.5 --low 0.3 --select 100

The CRF kernels and iterations are those of the run's saved config. Reads ground truth (a measurement,
not a pipeline step).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from wsss.camfile import load_cam
from wsss.config import load_config
from wsss.crf.dense import pseudo_mask
from wsss.evaluation.masks import mask_counts, mask_scores
from wsss.evaluation.metrics import iou_from_confusion
from wsss.log import setup_logging
from wsss.pipeline.runner import open_split
from wsss.pipeline.table import maps_folder


def _score_one(i: int, ds, maps: Path, crf, weights: dict[int, float]) -> tuple[np.ndarray, np.ndarray, int, int]:
    s = ds[i]
    classes, cams = load_cam(maps / f"{s.id}.npz", ds.num_classes)
    w = np.array([weights.get(int(c), 1.0) for c in classes], np.float32).reshape(-1, 1, 1)
    mask = pseudo_mask(ds.read_image(i), classes, np.clip(cams.astype(np.float32) * w, 0, 1), crf)
    return mask_counts(ds.read_mask(i), mask, len(ds.classes))


def score(pool: Pool, idx: list[int], ds, maps: Path, crf, weights: dict[int, float]) -> dict:
    """mIoU on kept pixels, kept share and every-pixel mIoU (with its per-class IoU) of ``idx``."""
    res = pool.map(partial(_score_one, ds=ds, maps=maps, crf=crf, weights=weights), idx)
    cm, cm_bg, valid, kept = (sum(r[j] for r in res) for j in range(4))
    every = iou_from_confusion(cm_bg)
    scores = mask_scores(cm, cm_bg, valid, kept, ds.classes)
    return {**{k: scores[k] for k in ("mIoU", "kept_share", "mIoU_ignored_as_bg")},
            "per_class_ignored_as_bg": dict(zip(ds.classes, (100 * every).round(1).tolist()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory with finished maps")
    ap.add_argument("--maps", choices=["affinity", "cam", "expand"], default="affinity")
    ap.add_argument("--fg", type=float, required=True, help="fg_threshold of the CRF")
    ap.add_argument("--low", type=float, required=True, help="low_threshold of the CRF")
    ap.add_argument("--select", type=int, default=100, help="the first N photos choose the weights")
    ap.add_argument("--grid", type=float, nargs="+", default=[0.6, 0.8, 1.25, 1.5])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args()
    setup_logging(1)
    cfg = load_config(args.run / "config.yaml")
    crf = cfg.crf.model_copy(update={"mode": "confidence", "fg_threshold": args.fg, "low_threshold": args.low})
    ds = open_split(args.run, cfg.cam.split)
    maps = maps_folder(cfg, args.run, args.maps)
    chosen_idx, other_idx = list(range(args.select)), list(range(args.select, len(ds)))
    with Pool(args.workers) as pool:
        weights: dict[int, float] = {}
        best = score(pool, chosen_idx, ds, maps, crf, weights)["mIoU_ignored_as_bg"]
        print(f"search on {len(chosen_idx)} photos: every-pixel mIoU {best:.2f} with no weights", flush=True)
        for c in range(1, ds.num_classes + 1):
            for v in args.grid:
                r = score(pool, chosen_idx, ds, maps, crf, {**weights, c: v})
                print(f"  {ds.classes[c]} x{v}: {r['mIoU_ignored_as_bg']:.2f}", flush=True)
                if r["mIoU_ignored_as_bg"] > best + 0.1:
                    best, weights = r["mIoU_ignored_as_bg"], {**weights, c: v}
        named = {ds.classes[c]: v for c, v in weights.items()}
        print(f"chosen: {named or 'none'} ({best:.2f} on the search photos)", flush=True)
        result = {"weights": named, "photos_scored": len(other_idx),
                  "without": score(pool, other_idx, ds, maps, crf, {}), "with": score(pool, other_idx, ds, maps, crf, weights)}
    for k in ("without", "with"):
        r = result[k]
        print(f"{k:>8} weights, {len(other_idx)} other photos: {r['mIoU']:.2f} on {r['kept_share']:.1f}% kept, "
              f"{r['mIoU_ignored_as_bg']:.2f} every pixel; {r['per_class_ignored_as_bg']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
