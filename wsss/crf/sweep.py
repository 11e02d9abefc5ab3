"""Choosing CRF settings on a labelled subset: every combination of a grid, scored against ground truth."""

from __future__ import annotations

import csv
import io
import itertools
import logging
import shutil
from pathlib import Path

import yaml
from pydantic import ValidationError

from wsss.config import CrfConfig, config_to_dict
from wsss.crf.pool import crf_jobs, run_crf
from wsss.data.dataset import Dataset
from wsss.errors import ConfigError, DataError
from wsss.evaluation.masks import evaluate_masks
from wsss.io import write_text

log = logging.getLogger(__name__)

#: the sweep.csv column each ``crf.sweep_score`` maximises
SCORE_COLUMN = {"kept_pixels": "mIoU", "every_pixel": "mIoU_ignored_as_bg"}
#: the confidence-mode thresholds, which the affinity stage sets in its own section
THRESHOLD_KEYS = ("fg_threshold", "low_threshold")


def choose_best(rows: list[dict], score: str, min_kept: float) -> tuple[dict, bool]:
    """The row with the highest ``score`` column among those keeping at least ``min_kept`` (a share in
    [0, 1]; rows give ``kept_share`` in %), and True; else the row keeping the most, and False. Scores
    within 0.1 mIoU of each other (the precision they are reported at) tie; the other score breaks ties.

    The tie-break matters for ``every_pixel``: in confidence mode a pixel is ignored where the background
    pass (``low_threshold``) calls it an object and the foreground pass calls it background, so with
    ignored pixels counted as background the score is nearly the foreground pass's alone, the same to
    0.01 for every ``low_threshold``; the kept-pixel mIoU then picks the ignore band."""
    other = next(c for c in SCORE_COLUMN.values() if c != score)
    ok = [r for r in rows if r["kept_share"] >= 100 * min_kept]
    if ok:
        top = max(r[score] for r in ok)
        return max((r for r in ok if r[score] >= top - 0.1 + 1e-9), key=lambda r: r[other]), True
    return max(rows, key=lambda r: r["kept_share"]), False


def sweep_crf(c: CrfConfig, ds: Dataset, cam_dir: Path, out: Path, source: str, n_images: int | None = None,
              workers: int | None = None, threshold_section: str = "crf") -> dict:
    """Try every combination of ``c.sweep`` on the first ``sweep_images`` images of ``ds`` (which needs
    ground truth) with the maps of ``cam_dir``, score each, and write ``out/{sweep.csv,best.yaml}``.

    Best = highest ``c.sweep_score`` (mIoU on kept pixels, or with ignored pixels as background) among
    settings keeping at least ``sweep_min_kept`` of the pixels (else the setting keeping the most).
    ``best.yaml`` is a config snippet to merge: the swept keys under ``crf:``, except the two thresholds,
    which go under ``threshold_section`` (``affinity`` when the maps are the affinity stage's walked maps)."""
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks: a sweep needs a labelled subset", ds.root)
    sub = ds.subset([s.id for s in ds.samples[: n_images or c.sweep_images]])
    keys = list(c.sweep)
    combos = list(itertools.product(*(c.sweep[k] for k in keys)))
    rows, skipped = [], []
    for n, values in enumerate(combos, 1):
        trial = c.model_copy(update=dict(zip(keys, values)))
        try:
            trial = CrfConfig(**config_to_dict(trial))  # validate the combination
        except ValidationError as e:  # e.g. low_threshold above fg_threshold: not a setting, so not a candidate
            skipped.append(dict(zip(keys, values)))
            log.info("sweep %d/%d %s: skipped, not a valid setting (%s)", n, len(combos), dict(zip(keys, values)),
                     e.errors()[0]["msg"])
            continue
        folder = out / f"trial_{n:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        jobs, _ = crf_jobs(sub, cam_dir, folder, skip_done=False, split=ds)
        folder.mkdir(parents=True)
        run_crf(jobs, trial, ds.num_classes, workers, desc=f"sweep {n}/{len(combos)}")
        res = evaluate_masks(folder, sub)
        shutil.rmtree(folder)
        rows.append({**dict(zip(keys, values)), "mIoU": res["mIoU"], "kept_share": res["kept_share"],
                     "mIoU_ignored_as_bg": res["mIoU_ignored_as_bg"]})
        log.info("sweep %d/%d %s: mIoU %.1f, kept %.1f%%, ignored as background %.1f", n, len(combos), dict(zip(keys, values)),
                 res["mIoU"], res["kept_share"], res["mIoU_ignored_as_bg"])
    if not rows:
        raise ConfigError(f"crf.sweep: none of its {len(combos)} combinations is a valid setting (e.g. low_threshold above fg_threshold)")
    score = SCORE_COLUMN[c.sweep_score]
    best, ok = choose_best(rows, score, c.sweep_min_kept)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, "mIoU", "kept_share", "mIoU_ignored_as_bg"])
    w.writeheader()
    w.writerows(rows)
    write_text(out / "sweep.csv", buf.getvalue())
    snippet: dict[str, dict] = {}
    for k in keys:
        snippet.setdefault(threshold_section if k in THRESHOLD_KEYS else "crf", {})[k] = best[k]
    header = (f"# wsss crf --sweep on {len(sub)} {ds.split} images ({source} maps, {c.mode} mode, best by {c.sweep_score}): "
              f"mIoU {best['mIoU']:.1f} with {best['kept_share']:.1f}% kept, {best['mIoU_ignored_as_bg']:.1f} with ignored "
              f"pixels as background{'' if ok else ' (no setting kept the required share)'}\n")
    write_text(out / "best.yaml", header + yaml.safe_dump(snippet, sort_keys=False))
    return {"rows": rows, "best": best, "met_min_kept": ok, "images": len(sub), "out": str(out), "skipped": skipped,
            "score": score}

