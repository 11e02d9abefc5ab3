"""Which CAM scales find large objects: a classifier's maps at each scale (with flips) on the first
``--n`` photos of a split, fused by several recipes, each scored at its best background threshold
(arg-max against a flat background score, every pixel) with the recall of small (<= 35% of the photo)
and large (> 35%) objects.

    python benchmarks/cam_scales.py --data ../shared/data/voc6 --classifier runs/p0/expand/round_1/cls/classifier.pt --n 300

"adaptive A": the recipe's scales, but where a class's map at scale 0.25 covers more than A of the photo
(above half its maximum) the fusion of scales 0.25, 0.5 and 1 instead. Maps and ground truth are
scored at a quarter of the photo's resolution. Reads ground truth (a measurement, not a pipeline step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsss.cam.extract import max_normalise, multiscale_maps
from wsss.cam.methods import create_cam_method
from wsss.data.dataset import load_voc
from wsss.data.transforms import to_tensor
from wsss.models.checkpoint import load_classifier

SCALES = (0.25, 0.5, 0.75, 1.0, 1.5)
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45)
FUSIONS = {
    "1, 0.5, 1.5 (the recipe's)": (0.5, 1.0, 1.5), "1": (1.0,), "0.25": (0.25,), "0.5": (0.5,), "0.75": (0.75,),
    "1.5": (1.5,), "0.5, 0.75, 1": (0.5, 0.75, 1.0), "0.25, 0.5, 1": (0.25, 0.5, 1.0), "all five": SCALES,
}


def fuse(per: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """Max-normalised sum of the raw maps ``per (len(SCALES), k, h, w)`` at ``scales``."""
    return max_normalise(sum(per[SCALES.index(s)] for s in scales))


def adaptive(per: torch.Tensor, share: float) -> torch.Tensor:
    small = max_normalise(per[SCALES.index(0.25)])
    big = (small > 0.5).float().mean(dim=(-2, -1)) > share
    return torch.where(big[:, None, None], fuse(per, (0.25, 0.5, 1.0)), fuse(per, (0.5, 1.0, 1.5)))


def score(data, maps_of, k: int) -> tuple[float, float, float, float]:
    """(mIoU % over the ``k`` classes, threshold, recall % of small objects, of large ones) at the best threshold."""
    best = None
    for t in THRESHOLDS:
        inter, union, found, total = np.zeros(k), np.zeros(k), np.zeros(2), np.zeros(2)
        for classes, per, gt in data:
            m = maps_of(per)
            ids = np.concatenate([[0], classes])
            pred = ids[torch.cat([torch.full((1, *m.shape[1:]), t), m]).argmax(0).numpy()]
            valid = gt != 255
            for c in range(k):
                inter[c] += ((pred == c) & (gt == c)).sum()
                union[c] += (((pred == c) | (gt == c)) & valid).sum()
            for c in classes:
                b = int((gt == c).sum() / valid.sum() > 0.35)
                found[b] += ((pred == c) & (gt == c)).sum()
                total[b] += (gt == c).sum()
        with np.errstate(invalid="ignore"):
            r = (100 * float(np.nanmean(inter / union)), t, 100 * found[0] / total[0], 100 * found[1] / total[1])
        if best is None or r[0] > best[0]:
            best = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--classifier", type=Path, required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--split", default="train")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ds = load_voc(args.data, args.split)
    model, meta = load_classifier(args.classifier)
    method = create_cam_method("cam", model)
    data = []
    with torch.no_grad():
        for i in range(min(args.n, len(ds))):
            s = ds[i]
            classes = np.array(sorted(s.labels))
            gt = ds.read_mask(i)
            size = (gt.shape[0] // 4, gt.shape[1] // 4)
            x = to_tensor(ds.read_image(i), meta["mean"], meta["std"])[None]
            cls_t = torch.tensor(classes - 1)
            per = torch.stack([multiscale_maps(method, x, cls_t, [sc], True, out_size=size)[0] for sc in SCALES])
            small_gt = F.interpolate(torch.from_numpy(gt)[None, None].float(), size=size, mode="nearest")[0, 0].numpy().astype(np.uint8)
            data.append((classes, per, small_gt))
    print(f"{len(data)} {args.split} photos; mIoU at the best background threshold, recall of objects <= / > 35% of the photo")
    rows = [(name, lambda p, sc=sc: fuse(p, sc)) for name, sc in FUSIONS.items()]
    rows += [(f"adaptive {a}", lambda p, a=a: adaptive(p, a)) for a in (0.2, 0.3, 0.4, 0.5)]
    for name, fn in rows:
        m, t, small, large = score(data, fn, len(ds.classes))
        print(f"  {name:28s} mIoU {m:5.1f} at {t:.2f}   recall small {small:5.1f}, large {large:5.1f}")


if __name__ == "__main__":
    main()
