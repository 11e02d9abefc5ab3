"""Measure the synthetic dataset: generator speed, how fast a tiny CNN learns it, and how far its
plain CAM falls short of the masks (the core difficulty of WSSS).

    python benchmarks/synth_difficulty.py --out runs/bench_synth

Prints a table and writes ``results.json`` into ``--out``. Used for the numbers in the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from wsss.config import SynthConfig, TrainClsConfig
from wsss.data.dataset import load_voc
from wsss.data.synth import generate
from wsss.cam import create_cam_method, extract_cams
from wsss.evaluation import cams_to_mask, sweep_cam_thresholds
from wsss.io import read_mask
from wsss.log import setup_logging
from wsss.evaluation.metrics import confusion, miou
from wsss.engine.classifier import evaluate_classifier, train_classifier

THRESHOLDS = [round(t, 2) for t in np.arange(0.05, 0.8, 0.05)]


def plain_cams(model, ds):
    """Single-scale, no-flip CAMs of every image's labelled classes (``(classes, maps)`` in ``ds`` order)."""
    method = create_cam_method("cam", model)
    items = ((s.id, ds.read_image(i), s.labels) for i, s in enumerate(ds))
    got = {sid: (c.astype(np.int64), m) for sid, c, m in extract_cams(method, items, mean=model.backbone.mean,
                                                                       std=model.backbone.std, scales=(1.0,), flip=False)}
    return [got[s.id] for s in ds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_synth"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    setup_logging(-1)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    scfg = SynthConfig(n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    t0 = time.perf_counter()
    root = generate(scfg, args.out / "synth", force=True)
    t_gen = time.perf_counter() - t0
    n_img = args.n_train + args.n_val

    tr, va = load_voc(root, "train"), load_voc(root, "val")
    ccfg = TrainClsConfig(backbone="tiny", output_stride=8, epochs=args.epochs, batch_size=16, optimizer="adamw",
                          lr=3e-3, head_lr_mult=1.0, weight_decay=1e-4, crop_size=scfg.size, scale_range=(0.9, 1.1),
                          color_jitter=0.2)
    t0 = time.perf_counter()
    summary = train_classifier(ccfg, tr, args.out / "cls", va, seed=args.seed)
    t_train = time.perf_counter() - t0
    from wsss.models.checkpoint import load_classifier

    model, _ = load_classifier(args.out / "cls" / "classifier.pt")
    val = evaluate_classifier(model, va, ccfg, torch.device("cpu"))

    cams = plain_cams(model, tr)
    gts = [read_mask(s.mask) for s in tr]
    parts = [read_mask(Path(str(s.mask).replace("SegmentationClass", "SegmentationPart"))) for s in tr]
    nc = len(tr.classes)
    sweep = sweep_cam_thresholds(((g, c, m) for g, (c, m) in zip(gts, cams)), nc, THRESHOLDS)
    oracle_part = miou(sum(confusion(g, p, nc) for g, p in zip(gts, parts)))
    # where the CAM fires: share of part pixels vs body-only pixels covered at the best threshold
    hit_part = hit_body = n_part = n_body = 0
    for g, p, (c, m) in zip(gts, parts, cams):
        pred = cams_to_mask(m, c, sweep.best_threshold) > 0
        part, body = p > 0, (g > 0) & (p == 0)
        hit_part += (pred & part).sum()
        n_part += part.sum()
        hit_body += (pred & body).sum()
        n_body += body.sum()
    res = {
        "images": n_img,
        "generator_images_per_s": n_img / t_gen,
        "generator_seconds": t_gen,
        "train_seconds": t_train,
        "train_epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "val_mAP": val["mAP"],
        "val_f1_micro": val["f1_micro"],
        "cam_best_threshold": sweep.best_threshold,
        "cam_miou": sweep.best_miou,
        "cam_fg_precision": sweep.precision[sweep.best_index],
        "cam_fg_recall": sweep.recall[sweep.best_index],
        "oracle_mask_miou": 1.0,
        "oracle_part_only_miou": oracle_part,
        "cam_covers_part": hit_part / max(n_part, 1),
        "cam_covers_body": hit_body / max(n_body, 1),
        "sweep": sweep.rows(),
    }
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=float))
    print(f"generator: {n_img} images in {t_gen:.1f} s ({res['generator_images_per_s']:.0f} images/s)")
    print(f"tiny CNN:  {args.epochs} epochs in {t_train:.0f} s on {res['threads']} threads; val mAP {val['mAP']:.3f}, micro-F1 {val['f1_micro']:.3f}")
    print(f"plain CAM (train, single scale): mIoU {100 * sweep.best_miou:.1f} at threshold {sweep.best_threshold}, "
          f"fg precision {100 * res['cam_fg_precision']:.1f}, recall {100 * res['cam_fg_recall']:.1f}")
    print(f"CAM covers {100 * res['cam_covers_part']:.1f}% of discriminative-part pixels but only {100 * res['cam_covers_body']:.1f}% of body pixels")
    print(f"references: ground-truth masks 100.0, part-only masks {100 * oracle_part:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
