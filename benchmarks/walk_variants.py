"""Variants of the affinity stage's random walk on a finished run (its head and maps), each scored after
the final CRF on the first ``--images`` labelled photos: every-pixel mIoU for several foreground
thresholds, and the kept-pixel mIoU of the pair (``--fg``, ``--low``).

    python benchmarks/walk_variants.py --run runs/seed1 --images 200 --variants class image bg:2 bg:8 power:2

Variants: ``class`` / ``image`` (``affinity.normalise``); ``bg:A`` walks a background channel
``(1 - max cam) ** A`` with the classes (AffinityNet's) and gives each class its share against it;
``power:G`` walks ``cam ** G`` (normalised per class). Reads ground truth (a measurement, not a
pipeline step); the CRF kernels and iterations are those of the run's saved config.
"""

from __future__ import annotations

import argparse
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from wsss.affinity.core import refine_maps, walk_full_resolution
from wsss.affinity.train import _input, embed, load_affinity_head
from wsss.camfile import load_cam
from wsss.config import load_config
from wsss.crf.dense import refine_many
from wsss.evaluation.masks import mask_counts, mask_scores
from wsss.evaluation.metrics import iou_from_confusion
from wsss.log import setup_logging
from wsss.models.checkpoint import load_classifier
from wsss.pipeline.runner import open_split
from wsss.pipeline.table import cam_source, maps_folder


def walk_variant(name: str, cams: np.ndarray, emb: torch.Tensor, radius: int, beta: float, steps: int) -> np.ndarray:
    """Walked maps ``(k, H, W)`` in [0, 1] of ``cams (k, H, W)`` for one variant name."""
    kind, _, arg = name.partition(":")
    if kind in ("class", "image"):
        return refine_maps(cams, emb, radius, beta, steps, kind)
    if kind == "power":
        return refine_maps(cams ** float(arg), emb, radius, beta, steps)
    if kind != "bg":
        raise ValueError(f"unknown variant {name!r} (class, image, bg:A, power:G)")
    bg = (1.0 - cams.max(0, keepdims=True)) ** float(arg)
    up = walk_full_resolution(np.concatenate([bg, cams]), emb, radius, beta, steps)
    return (up[1:] / (up[1:] + up[:1]).clamp_min(1e-6)).numpy()


def _crf_counts(job: tuple[int, np.ndarray, dict[str, np.ndarray]], ds, crf, fgs: list[float], low: float, pair_fg: float) -> dict:
    i, classes, by_variant = job
    image, gt = ds.read_image(i), ds.read_mask(i)
    ids = np.concatenate([[0], classes]).astype(np.uint8)
    thresholds = sorted(set(fgs) | {low, pair_fg})
    out = {}
    for v, maps in by_variant.items():
        labels = dict(zip(thresholds, refine_many(image, maps, thresholds, crf)))
        res = {t: mask_counts(gt, ids[labels[t]], len(ds.classes)) for t in fgs}
        pair = ids[labels[pair_fg]]
        pair[labels[pair_fg] != labels[low]] = 255
        res["pair"] = mask_counts(gt, pair, len(ds.classes))
        out[v] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run directory after `wsss affinity`")
    ap.add_argument("--images", type=int, default=200, help="the first N photos of the split")
    ap.add_argument("--variants", nargs="+", default=["class", "image"])
    ap.add_argument("--fgs", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6], help="foreground thresholds scored on every pixel")
    ap.add_argument("--fg", type=float, default=0.5, help="the pair's fg_threshold")
    ap.add_argument("--low", type=float, default=0.3, help="the pair's low_threshold")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    setup_logging(1)
    cfg = load_config(args.run / "config.yaml")
    a = cfg.affinity
    ds = open_split(args.run, cfg.cam.split)
    maps = maps_folder(cfg, args.run, cam_source(cfg, args.run))
    model, meta = load_classifier(args.run / "cls" / "classifier.pt", torch.device("cpu"))
    backbone = model.backbone.eval()
    head = load_affinity_head(args.run / "affinity" / "head.pt", torch.device("cpu"))
    jobs = []
    for i in range(min(args.images, len(ds))):
        classes, cams = load_cam(maps / f"{ds[i].id}.npz", ds.num_classes)
        with torch.no_grad():
            emb = embed(backbone, head, _input(ds.read_image(i), meta["mean"], meta["std"], torch.device("cpu")))
        jobs.append((i, classes, {v: walk_variant(v, cams, emb, a.radius, a.beta, a.steps) for v in args.variants}))
    crf = a.crf_settings(cfg.crf)
    with Pool(args.workers) as pool:
        res = pool.map(partial(_crf_counts, ds=ds, crf=crf, fgs=args.fgs, low=args.low, pair_fg=args.fg), jobs)
    for v in args.variants:
        every = {t: mask_scores(*(sum(r[v][t][j] for r in res) for j in range(4)), ds.classes)["mIoU_ignored_as_bg"] for t in args.fgs}
        counts = [sum(r[v]["pair"][j] for r in res) for j in range(4)]
        s = mask_scores(*counts, ds.classes)
        per_class = " ".join(f"{c} {100 * float(x):.1f}" for c, x in zip(ds.classes, iou_from_confusion(counts[1])))
        print(f"{v:>8}: every pixel by fg threshold {' '.join(f'{t}: {m:.1f}' for t, m in every.items())} | "
              f"{args.fg} / {args.low}: {s['mIoU']:.1f} on {s['kept_share']:.1f}% kept, {s['mIoU_ignored_as_bg']:.1f} every pixel; "
              f"per class (every pixel) {per_class}", flush=True)


if __name__ == "__main__":
    main()
