"""Cost of ``cam.refine: prototype`` in CAM extraction, measured side by side (a ratio, not a time).

Extracts the same photos with a trained classifier as the cam stage does (batch norm folded, NHWC,
``cam.scales`` with flips), with and without the prototype refiner, the two taking turns ``--rounds``
times so that a slow spell of a shared machine hits both alike; prints the median seconds of each and
their ratio.

    python benchmarks/refine_cost.py --data ../shared/data/voc6 --classifier runs/p0/cls/classifier.pt --n 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsss.cam import create_cam_method, extract_cams
from wsss.cam.prototype import PrototypeRefiner
from wsss.data.dataset import read_classes, read_labels_csv
from wsss.models.checkpoint import load_classifier
from wsss.models.inference import fold_batchnorm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="VOC folder (JPEGImages, labels.csv, classes.txt)")
    ap.add_argument("--classifier", type=Path, required=True, help="a trained classifier.pt")
    ap.add_argument("--n", type=int, default=40, help="first N train photos")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 1.5])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    classes = read_classes(args.data / "classes.txt")
    labels = read_labels_csv(args.data / "labels.csv", classes)
    ids = (args.data / "ImageSets/Segmentation/train.txt").read_text().split()[: args.n]
    photos = [(i, np.array(Image.open(args.data / "JPEGImages" / f"{i}.jpg").convert("RGB")), labels[i]) for i in ids]
    model, meta = load_classifier(args.classifier)
    refiner = PrototypeRefiner(model.backbone)  # the unfolded backbone: the folded one has no levels
    fast = fold_batchnorm(model).to(memory_format=torch.channels_last)
    method = create_cam_method("cam", fast)

    def run(refine) -> float:
        t0 = time.perf_counter()
        for _ in extract_cams(method, photos, mean=meta["mean"], std=meta["std"], scales=args.scales, flip=True,
                              batch_size=8, batch_pixels=250_000, channels_last=True, refine=refine):
            pass
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"plain": [], "prototype": []}
    run(None)  # warm-up
    for _ in range(args.rounds):
        times["plain"].append(run(None))
        times["prototype"].append(run(refiner))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"images": len(photos), "scales": args.scales, "median_s": {k: round(v, 2) for k, v in med.items()},
                      "ratio_prototype_to_plain": round(med["prototype"] / med["plain"], 3), "all_s": times}, indent=1))


if __name__ == "__main__":
    main()
