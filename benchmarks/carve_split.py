"""Carve a tuning split out of a VOC-style dataset's train split, so that segmenter choices are scored on
photos with ground truth without touching its val split.

    python benchmarks/carve_split.py --root ../shared/data/voc6 --out runs/voc6tune --fit 800 --seed 19

Writes ``OUT/ImageSets/Segmentation/train.txt`` (``--fit`` ids) and ``val.txt`` (the other train ids), a
seeded shuffle of the source ``train.txt``, and links everything else (photos, masks, labels, classes)
to the source: run any config on it with ``data.root=OUT``. Nothing of the source's val split is used.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def carve(root: Path, out: Path, fit: int, seed: int) -> tuple[int, int]:
    """Write the carved split; returns (fit ids, scored ids)."""
    ids = [line.strip() for line in (root / "ImageSets/Segmentation/train.txt").read_text().splitlines() if line.strip()]
    if not 0 < fit < len(ids):
        raise SystemExit(f"--fit must be between 1 and {len(ids) - 1} (train has {len(ids)} ids), got {fit}")
    order = np.random.default_rng(seed).permutation(len(ids))
    sets = out / "ImageSets/Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "train.txt").write_text("".join(f"{ids[i]}\n" for i in sorted(order[:fit])))
    (sets / "val.txt").write_text("".join(f"{ids[i]}\n" for i in sorted(order[fit:])))
    for entry in root.iterdir():
        if entry.name != "ImageSets" and not (out / entry.name).exists():
            os.symlink(entry.resolve(), out / entry.name)
    return fit, len(ids) - fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="VOC-style dataset with ImageSets/Segmentation/train.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fit", type=int, default=800, help="train ids kept for fitting; the rest are scored")
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args()
    n_fit, n_scored = carve(args.root, args.out, args.fit, args.seed)
    print(f"{args.out}: {n_fit} ids to fit (train.txt), {n_scored} to score (val.txt)")


if __name__ == "__main__":
    main()
