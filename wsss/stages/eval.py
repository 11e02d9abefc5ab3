"""The eval stage: score every finished map / mask / prediction folder of the run that has ground truth to
compare with (:mod:`wsss.evaluation`); writes ``RUN/eval/summary.json`` (one entry per scored stage) and
each scored folder's ``eval/`` (CAMs: ``sweep.csv``, ``sweep.png``, ``summary.json``; masks and
predictions: ``summary.json``, ``confusion.csv``). Evaluation is the only place ground truth is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.evaluation.cams import evaluate_cam_folder, write_cam_report
from wsss.evaluation.masks import evaluate_masks, write_mask_report
from wsss.io import remove_temp_files, write_json
from wsss.manifest import StageOutcome, read_manifest
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import EVAL_SUBFOLDER, folder_of, mask_stages, masks_folder

log = logging.getLogger(__name__)


def _scored(ctx: StageContext) -> tuple[list[str], list[str], dict | None]:
    """(finished map stages, finished mask stages, the predictions' manifest) this run scores."""
    cfg = ctx.cfg
    maps = [n for n in (("cam", "expand") if cfg.expand.enabled else ("cam",)) if read_manifest(ctx.folder(n)) is not None]
    masks = [n for n in mask_stages(cfg) if read_manifest(ctx.folder(n)) is not None]
    return maps, masks, read_manifest(ctx.folder("predict"))


def inputs(ctx: StageContext) -> dict[str, str]:
    maps, masks, pred = ctx.found["scored"] = _scored(ctx)
    keys = {name: read_manifest(ctx.folder(name))["key"] for name in (*maps, *masks)}
    return keys | ({"predict": pred["key"]} if pred is not None else {})


def section(cfg: Config) -> dict:
    return config_to_dict(cfg.eval)


def run(ctx: StageContext) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    maps, masks, pred = ctx.found["scored"]
    pred_dir = ctx.folder("predict")
    for folder in (pred_dir / EVAL_SUBFOLDER, *(ctx.folder(name) / EVAL_SUBFOLDER for name in (*maps, *masks))):
        remove_temp_files(folder)  # left by a killed eval
    results = {}
    split = cfg.cam.split
    ds = ctx.split(split) if maps or masks else None
    if ds is not None and not ds.has_masks:
        log.warning("eval: split '%s' has no ground-truth masks; %s not scored", split, ", ".join([*maps, *masks]))
        maps, masks = [], []
    for name in maps:
        res = evaluate_cam_folder(ctx.folder(name), ds, cfg.eval.thresholds)
        r = results[name] = write_cam_report(res, ds.classes, ctx.folder(name) / EVAL_SUBFOLDER, title=f"{name} on {split}")
        log.info("eval %s: mIoU %.1f at threshold %.2f (fg precision %.1f, recall %.1f) on %d %s images", name,
                 r["mIoU"], r["best_threshold"], r["fg_precision"], r["fg_recall"], len(ds), split)
    for name in masks:
        res = evaluate_masks(masks_folder(cfg, run_dir, name), ds)
        write_mask_report(res, ds.classes, ctx.folder(name) / EVAL_SUBFOLDER)
        results[name] = {k: v for k, v in res.items() if k != "confusion"}
        log.info("eval %s: mIoU %.1f on kept pixels, %.1f%% kept (%.1f with ignored pixels as background), on %d %s images", name,
                 res["mIoU"], res["kept_share"], res["mIoU_ignored_as_bg"], len(ds), split)
    if pred is not None:
        pds = ctx.split(cfg.predict.split)
        if pds.has_masks:
            res = evaluate_masks(pred_dir, pds)
            write_mask_report(res, pds.classes, pred_dir / EVAL_SUBFOLDER)
            results["seg"] = {k: v for k, v in res.items() if k not in ("confusion", "kept_share", "mIoU_ignored_as_bg")} | {"split": cfg.predict.split}
            log.info("eval seg: mIoU %.1f on %d %s images", res["mIoU"], len(pds), cfg.predict.split)
        else:
            log.warning("eval: split '%s' has no ground-truth masks; segmenter predictions not scored", cfg.predict.split)
    write_json(ctx.out / "summary.json", results)
    return {name: {k: r[k] for k in ("mIoU", "best_threshold", "kept_share") if k in r} for name, r in results.items()}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    return f"eval: {'up to date' if outcome.skipped else 'done'}; {', '.join(outcome.manifest['outputs'])} -> {folder_of(cfg, run_dir, 'eval')}"
