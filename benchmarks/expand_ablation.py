"""Expansion ablation: plain CAM vs each expansion method vs combinations, on one run's classifier and
CAMs. For each variant: CAM mIoU at the best threshold, foreground precision and recall, and the
fine-tuning / extraction cost. Every variant fine-tunes for the same epochs (``expand.epochs``; per
round for erasing), and ``plain`` (fine-tuning alone) is the control at equal cost.

    python benchmarks/expand_ablation.py configs/demo.yaml --variants plain,erasing,hide_and_seek,acol,mixup
    python benchmarks/expand_ablation.py configs/voc6_lite0.yaml --variants plain,hide_and_seek expand.epochs=2

Needs the run's ``cls/`` and ``cam/`` (``wsss run CONFIG --to cam``). Writes
``RUN/ablation/<variant>/`` and ``RUN/ablation/table.md`` / ``table.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from wsss.cli import split_overrides
from wsss.config import load_config
from wsss.io import read_json, write_json, write_text
from wsss.log import setup_logging
from wsss.manifest import read_manifest
from wsss.stages.data import open_split
from wsss.stages.eval import evaluate_cam_folder
from wsss.stages.expand import run_expand
from wsss.stages.train_cls import resolve_device


def score(folder: Path, ds, thresholds) -> dict:
    r = evaluate_cam_folder(folder, ds, thresholds)
    b = r.best_index
    return {"mIoU": round(100 * r.best_miou, 2), "threshold": r.best_threshold,
            "fg_precision": round(100 * r.precision[b], 2), "fg_recall": round(100 * r.recall[b], 2)}


def main() -> int:
    argv, overrides = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--variants", default="plain,erasing,hide_and_seek,acol,mixup",
                    help="comma-separated; join methods with + for a combination (e.g. hide_and_seek+erasing)")
    args = ap.parse_args(argv)
    setup_logging(0)
    cfg = load_config(args.config, overrides)
    run_dir = Path(cfg.run.out_dir)
    if read_manifest(run_dir / "cls") is None or read_manifest(run_dir / "cam") is None:
        print(f"error: {run_dir} has no finished cls/ and cam/; run `wsss run {args.config} --to cam` first", file=sys.stderr)
        return 2
    train = open_split(run_dir, cfg.cam.split)
    val = open_split(run_dir, cfg.data.val_split) if cfg.data.val_split else None
    device = resolve_device(cfg.cam.device)
    out = run_dir / "ablation"
    ths = cfg.eval.thresholds
    rows = [{"variant": "CAM (stage 2)", "finetune_s": 0.0, "extract_s": None, **score(run_dir / "cam", train, ths)}]
    print(rows[-1], flush=True)
    for variant in args.variants.split(","):
        methods = variant.split("+")
        vcfg = cfg.model_copy(update={"expand": cfg.expand.model_copy(update={"methods": methods})})
        folder = out / variant
        done = folder / "result.json"
        if done.is_file():
            row = read_json(done)
        else:
            rep = run_expand(vcfg, train, val, run_dir / "cls" / "classifier.pt", run_dir / "cam", folder, device)
            row = {"variant": variant, "finetune_s": rep["finetune_s"], "extract_s": rep["extract_s"],
                   "rounds": len(rep["rounds"]), **score(folder, train, ths)}
            write_json(done, row)
        rows.append(row)
        print(row, flush=True)
    keys = ["variant", "mIoU", "threshold", "fg_precision", "fg_recall", "finetune_s", "extract_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(out / "table.csv", buf.getvalue())
    base = rows[0]["mIoU"]
    md = ["| variant | mIoU | Δ vs CAM | threshold | fg precision | fg recall | fine-tuning s | extraction s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ext = "" if r["extract_s"] is None else f"{r['extract_s']:.0f}"
        md.append(f"| {r['variant']} | {r['mIoU']:.1f} | {r['mIoU'] - base:+.1f} | {r['threshold']:.2f} | {r['fg_precision']:.1f} | "
                  f"{r['fg_recall']:.1f} | {r['finetune_s']:.0f} | {ext} |")
    write_text(out / "table.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
