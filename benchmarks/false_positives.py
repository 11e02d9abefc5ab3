"""Where a class's false positives on background lie: by distance to the nearest true pixel of the class,
and how few photos hold most of them.

    python benchmarks/false_positives.py --data ../shared/data/voc6 --masks runs/p0/affinity/masks --cls person

Reads ground truth (a measurement, not a pipeline step). Photos: the split's photos tagged with the class.
Distance bins are in pixels of the photo (voc6 photos are about 500 x 375).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from wsss.data.dataset import load_voc
from wsss.io import IGNORE, read_mask

EDGES = (0, 8, 16, 32, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="VOC-style folder with ground truth")
    ap.add_argument("--masks", type=Path, required=True, help="folder of <id>.png masks to examine")
    ap.add_argument("--cls", required=True, help="class name, e.g. person")
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    ds = load_voc(args.data, args.split)
    if args.cls not in ds.classes:
        raise SystemExit(f"unknown class '{args.cls}'; the dataset's are: {', '.join(ds.classes[1:])}")
    k = ds.classes.index(args.cls)
    bins = np.zeros(len(EDGES), np.int64)
    per_photo, tp, fn, other = [], 0, 0, 0
    for i, s in enumerate(ds):
        if k not in s.labels:
            continue
        gt, pred = ds.read_mask(i), read_mask(args.masks / f"{s.id}.png", num_classes=len(ds.classes))
        valid = gt != IGNORE
        wrong = (pred == k) & (gt == 0) & valid
        # distance of every pixel to the nearest true pixel of the class (inf-like where the photo has none)
        dist = ndimage.distance_transform_edt(gt != k) if (gt == k).any() else np.full(gt.shape, 1e9)
        bins += np.bincount(np.searchsorted(EDGES, dist[wrong], side="left").clip(1, len(EDGES)) - 1,
                            minlength=len(EDGES))[:len(EDGES)]
        tp += int(((pred == k) & (gt == k)).sum())
        fn += int(((pred != k) & (gt == k)).sum())
        other += int(((pred == k) & (gt != k) & (gt != 0) & valid).sum())
        per_photo.append((int(wrong.sum()), s.id, float((gt == k).sum() / valid.sum()), float((pred == k).sum() / valid.sum())))
    per_photo.sort(reverse=True)
    total = max(sum(n for n, *_ in per_photo), 1)
    print(f"{len(per_photo)} photos tagged {args.cls}: true pixels found {tp}, missed {fn}, "
          f"background called {args.cls} {total}, another class called {args.cls} {other}")
    labels = [f"({a}, {b}]" for a, b in zip(EDGES, EDGES[1:])] + [f"> {EDGES[-1]}"]
    for lab, n in zip(labels, bins):
        print(f"  background called {args.cls} at distance {lab:>9} px: {n:9d} ({100 * n / total:4.1f}%)")
    for top in (10, 20, 40):
        print(f"  the {top} worst photos hold {100 * sum(n for n, *_ in per_photo[:top]) / total:.1f}% of them")
    print("  worst photos (id, true share of the photo, predicted share):")
    for n, sid, true, pred in per_photo[:8]:
        print(f"    {sid}: {true:.2f} true, {pred:.2f} predicted")


if __name__ == "__main__":
    main()
