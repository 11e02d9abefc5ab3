"""Compare the outputs of two run directories: are they the same run?

    python benchmarks/compare_runs.py RUN_A RUN_B

Every CAM file (``.npz`` under cam/, expand/, affinity/maps/) must hold equal arrays, every mask or
prediction PNG (crf/, affinity/masks/, predict/, predict_gt/) equal bytes, and ``eval/summary.json``
equal metrics. Prints one line per kind of file and exits 1 on the first kind that differs. Used to
show that a refactoring changed no result (same config, same seed, on one machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MAPS = ("cam", "expand", "affinity/maps")
MASKS = ("crf", "affinity/masks", "predict", "predict_gt")


def _files(run: Path, folders: tuple[str, ...], suffix: str) -> dict[str, Path]:
    out = {}
    for folder in folders:
        base = run / folder
        if base.is_dir():
            for p in base.rglob(f"*{suffix}"):
                rel = p.relative_to(run)
                if "eval" not in rel.parts and "round_" not in str(rel) and "inspect" not in rel.parts:
                    out[str(rel)] = p
    return out


def compare(a: Path, b: Path) -> list[str]:
    """Lines describing each kind of output; a line starting with 'DIFFERENT' marks a difference."""
    lines = []
    maps_a, maps_b = _files(a, MAPS, ".npz"), _files(b, MAPS, ".npz")
    same = sorted(maps_a) == sorted(maps_b)
    diff = [k for k in maps_a if same and not all(np.array_equal(x, y) for x, y in
                                                    zip(np.load(maps_a[k]).values(), np.load(maps_b[k]).values()))]
    lines.append(f"{'same' if same and not diff else 'DIFFERENT'}: {len(maps_a)} vs {len(maps_b)} CAM .npz files"
                 + (f" ({len(diff)} differ, first {diff[0]})" if diff else ""))
    masks_a, masks_b = _files(a, MASKS, ".png"), _files(b, MASKS, ".png")
    same = sorted(masks_a) == sorted(masks_b)
    diff = [k for k in masks_a if same and masks_a[k].read_bytes() != masks_b[k].read_bytes()]
    lines.append(f"{'same' if same and not diff else 'DIFFERENT'}: {len(masks_a)} vs {len(masks_b)} mask/prediction PNGs"
                 + (f" ({len(diff)} differ, first {diff[0]})" if diff else ""))
    sa, sb = (json.loads((r / "eval" / "summary.json").read_text()) for r in (a, b))
    lines.append(f"{'same' if sa == sb else 'DIFFERENT'}: eval/summary.json metrics ({', '.join(sorted(sa))})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    lines = compare(args.a, args.b)
    print("\n".join(lines))
    return 1 if any(line.startswith("DIFFERENT") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
