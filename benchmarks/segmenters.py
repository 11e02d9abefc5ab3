"""Every segmenter family on the same data, same epochs, from scratch: val mIoU and seconds per epoch.

    python benchmarks/segmenters.py --out runs/bench_seg                       # the synthetic demo set
    python benchmarks/segmenters.py --config configs/voc6_lite0_60min.yaml --masks-from runs/r1 \\
        --archs deeplabv3 deeplabv3plus unet --out runs/bench_seg_voc6         # voc6, the run's pseudo-masks

Each segmenter is trained with `wsss train-seg` in its own copy of a run folder (the data stage, and with
``--masks-from`` the pseudo-masks of that run); the val split is scored once, after the last epoch
(single scale, no flip, no CRF), from the training log. Seconds per epoch: the median of the epochs
without scoring. Run it alone: two torch jobs on 2 cores slow each other several-fold. Writes
``table.md`` and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the head options of each family on the demo's tiny network (DeepLab's ASPP width as in configs/demo.yaml)
DEMO_OPTIONS = {"deeplabv3": [], "deeplabv3plus": [], "deeplabv2": ["train_seg.channels=null"],
                "deeplabv2_largefov": ["train_seg.channels=null"], "fcn": ["train_seg.channels=null"],
                "fcn_skip": ["train_seg.channels=null"], "unet": ["train_seg.channels=null"], "hrnet": []}


def main(argv: list[str] | None = None) -> int:
    from wsss.cli import main as wsss
    from wsss.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--archs", nargs="+", default=list(DEMO_OPTIONS),
                    help="segmenters, each optionally with its own overrides: ARCH[:key=value,key=value]")
    ap.add_argument("--masks-from", type=Path, help="a run whose pseudo-masks (and data stage) to train on; default: "
                    "the ground truth of a fresh data stage (--masks gt)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every segmenter (e.g. train_seg.epochs=6)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base"
    if args.masks_from is None:
        if wsss(["run", args.config, f"run.out_dir={base}", *args.overrides, "--to", "data"]) != 0:
            return 1
    epochs = load_config(args.config, [*args.overrides]).train_seg.epochs
    results = []
    for entry in args.archs:
        arch, _, extra = entry.partition(":")
        extra_overrides = [e for e in extra.split(",") if e]
        run = args.out / entry.replace(":", "_").replace("=", "").replace(",", "_")
        if run.exists():
            shutil.rmtree(run)
        src = args.masks_from or base
        # maps are not read by train-seg (their manifests stay, so the pseudo-mask stage is still up to date)
        shutil.copytree(src, run, ignore=shutil.ignore_patterns("seg", "seg_gt", "predict", "predict_gt", "ablation", "inspect", "*.npz"))
        cmd = ["train-seg", args.config, f"run.out_dir={run}", *args.overrides, f"train_seg.arch={arch}",
               *DEMO_OPTIONS.get(arch, []), *extra_overrides, f"train_seg.eval_every={epochs}", "--no-resume"]
        if args.masks_from is None:
            cmd += ["--masks", "gt"]
        if wsss(cmd) != 0:
            return 1
        log_csv = run / ("seg_gt" if args.masks_from is None else "seg") / "log.csv"
        with open(log_csv) as f:
            rows = list(csv.DictReader(f))
        secs = [float(r["seconds"]) for r in rows if not r.get("val_mIoU")]
        results.append({"arch": entry, "val_mIoU": round(float(rows[-1]["val_mIoU"]), 1), "epochs": len(rows),
                        "seconds_per_epoch": round(statistics.median(secs), 1) if secs else None})
        print(json.dumps(results[-1]), flush=True)
    lines = ["| segmenter | val mIoU | s / epoch |", "|---|---|---|"]
    lines += [f"| {r['arch']} | {r['val_mIoU']} | {r['seconds_per_epoch']} |" for r in results]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
