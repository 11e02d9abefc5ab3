"""Peak memory of CAM extraction and the CRF on one big photo, with and without the working-resolution cap.

    python benchmarks/big_photo_memory.py [--height 4000 --width 6000] [--uncapped]

Each measurement runs in its own process (peak resident memory, ``ru_maxrss``, is per process), on a
synthetic photo of the given size, with the default settings of ``configs/demo.yaml``'s sections (CAM
scales 1, 0.5, 1.5, 2 + flip on the tiny backbone; the confidence-mode CRF on one class). ``--uncapped``
also measures ``max_side=null`` (slow: minutes, and many GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(stage: str, h: int, w: int, max_side: int | None) -> dict:
    import numpy as np
    import torch

    from wsss.cam.extract import extract_cams
    from wsss.cam.methods import create_cam_method
    from wsss.config import CamConfig, CrfConfig, load_config
    from wsss.crf import pool
    from wsss.models.checkpoint import build_classifier

    cfg = load_config("configs/demo.yaml")
    rng = np.random.default_rng(0)
    photo = np.zeros((h, w, 3), np.uint8)
    photo[:] = rng.integers(0, 255, 3)
    photo[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)  # an object on a plain background
    base = _peak_mb()
    t0 = time.perf_counter()
    if stage == "cam":
        torch.manual_seed(0)
        model = build_classifier(cfg.train_cls, 4).eval()
        c: CamConfig = cfg.cam.model_copy(update={"max_side": max_side})
        method = create_cam_method(c.method, model, c.target_layer)
        ((_, _, cams),) = extract_cams(method, [("x", photo, [1])], mean=model.backbone.mean, std=model.backbone.std,
                                       scales=c.scales, flip=c.flip, batch_pixels=c.batch_pixels, max_side=c.max_side)
        shape = list(cams.shape)
    else:
        cams = np.zeros((1, h, w), np.float32)
        cams[0, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
        written = {}
        pool.load_cam = lambda path, k: (np.array([1]), cams)
        pool.read_image = lambda path: photo
        pool.write_palette_png = lambda path, mask: written.setdefault("mask", mask)
        pool.crf_one(("x", "x.jpg", "x.npz", "x.png"), CrfConfig(**{**cfg.crf.model_dump(), "max_side": max_side}), 1)
        shape = list(written["mask"].shape)
    return {"stage": stage, "max_side": max_side, "photo": [h, w], "output": shape, "seconds": round(time.perf_counter() - t0, 1),
            "peak_mb": round(_peak_mb()), "before_mb": round(base)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--uncapped", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "MAX_SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        stage, side = args.child
        print(json.dumps(child(stage, args.height, args.width, None if side == "none" else int(side))))
        return 0
    for stage in ("cam", "crf"):
        for side in ["1024", *(["none"] if args.uncapped else [])]:
            p = subprocess.run([sys.executable, __file__, "--height", str(args.height), "--width", str(args.width), "--child", stage, side],
                               capture_output=True, text=True)
            print(p.stdout.strip() if p.returncode == 0 else f"{stage} max_side={side}: failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
