"""Choosing CRF settings on a labelled subset: every combination of a grid, scored against ground truth."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import shutil
from pathlib import Path

import yaml

from wsss.config import CrfConfig, config_to_dict
from wsss.crf.pool import crf_jobs, run_crf
from wsss.data.dataset import Dataset
from wsss.errors import DataError
from wsss.evaluation.masks import evaluate_masks
from wsss.io import write_text

log = logging.getLogger(__name__)


def sweep_crf(c: CrfConfig, ds: Dataset, cam_dir: Path, out: Path, source: str, n_images: int | None = None,
              workers: int | None = None) -> dict:
    """Try every combination of ``c.sweep`` on the first ``sweep_images`` images of ``ds`` (which needs
    ground truth) with the maps of ``cam_dir``, score each, and write ``out/{sweep.csv,best.yaml}``.

    Best = highest mIoU among settings keeping at least ``sweep_min_kept`` of the pixels (else the
    setting keeping the most). ``best.yaml`` is a config snippet (a ``crf:`` section) to merge."""
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks: a sweep needs a labelled subset", ds.root)
    sub = ds.subset([s.id for s in ds.samples[: n_images or c.sweep_images]])
    keys = list(c.sweep)
    combos = list(itertools.product(*(c.sweep[k] for k in keys)))
    rows = []
    for n, values in enumerate(combos, 1):
        trial = c.model_copy(update=dict(zip(keys, values)))
        trial = CrfConfig(**config_to_dict(trial))  # validate the combination
        folder = out / f"trial_{n:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        jobs, _ = crf_jobs(sub, cam_dir, folder, skip_done=False, split=ds)
        folder.mkdir(parents=True)
        run_crf(jobs, trial, ds.num_classes, workers, desc=f"sweep {n}/{len(combos)}")
        res = evaluate_masks(folder, sub)
        shutil.rmtree(folder)
        rows.append({**dict(zip(keys, values)), "mIoU": res["mIoU"], "kept_share": res["kept_share"]})
        log.info("sweep %d/%d %s: mIoU %.1f, kept %.1f%%", n, len(combos), dict(zip(keys, values)), res["mIoU"], res["kept_share"])
    ok = [r for r in rows if r["kept_share"] >= 100 * c.sweep_min_kept]
    best = max(ok, key=lambda r: r["mIoU"]) if ok else max(rows, key=lambda r: r["kept_share"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, "mIoU", "kept_share"])
    w.writeheader()
    w.writerows(rows)
    write_text(out / "sweep.csv", buf.getvalue())
    snippet = {"crf": {k: best[k] for k in keys}}
    header = (f"# wsss crf --sweep on {len(sub)} {ds.split} images ({source}, {c.mode} mode): mIoU {best['mIoU']:.1f} "
              f"with {best['kept_share']:.1f}% kept{'' if ok else ' (no setting kept the required share)'}\n")
    write_text(out / "best.yaml", header + yaml.safe_dump(snippet, sort_keys=False))
    return {"rows": rows, "best": best, "met_min_kept": bool(ok), "images": len(sub), "out": str(out)}

