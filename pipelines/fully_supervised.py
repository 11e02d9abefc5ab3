"""The fully-supervised reference flow: data -> train-seg on the ground-truth masks of the training
split -> predict -> score, with the run's own segmenter recipe (``train_seg``/``predict`` sections).

Its outputs sit beside the weakly-supervised ones (``RUN/seg_gt/``, ``RUN/predict_gt/<split>/``), so the
report of the standard flow can show the ratio weakly- / fully-supervised.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipelines.standard import RunResult
from wsss.config import Config, save_config
from wsss.errors import DataError
from wsss.io import remove_temp_files
from wsss.stages.crf import evaluate_masks, write_mask_report
from wsss.stages.data import open_split, run_data_stage
from wsss.stages.predict import predict_folder, run_predict_stage
from wsss.stages.train_seg import run_train_seg_stage

log = logging.getLogger(__name__)

STAGE_ORDER: tuple[str, ...] = ("data", "train-seg", "predict", "eval")


def reference_config(cfg: Config) -> Config:
    """``cfg`` with the segmenter trained on ground truth."""
    ref = cfg.model_copy(deep=True)
    ref.train_seg.masks = "gt"
    return ref


def run(cfg: Config, force: tuple[str, ...] = ()) -> RunResult:
    """Run the reference flow into ``cfg.run.out_dir``; ``force`` names stages to redo (and later ones)."""
    cfg = reference_config(cfg)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(run_dir, recursive=False)  # a killed report or config write; stages clean their own folders
    save_config(cfg, run_dir / "config_fully_supervised.yaml")
    forced_from = min((STAGE_ORDER.index(s) for s in force if s in STAGE_ORDER), default=len(STAGE_ORDER))
    result = RunResult(run_dir)
    steps = [("data", lambda f: run_data_stage(cfg.data, run_dir, force=f)),
             ("train-seg", lambda f: run_train_seg_stage(cfg, run_dir, force=f)),
             ("predict", lambda f: run_predict_stage(cfg, run_dir, force=f))]
    for i, (name, fn) in enumerate(steps):
        t0 = time.time()
        outcome = fn(i >= forced_from)
        result.done.append((name, time.time() - t0, outcome.skipped))
    t0 = time.time()
    pred = predict_folder(cfg, run_dir)
    ds = open_split(run_dir, cfg.predict.split)
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks to score the reference against", ds.root)
    res = evaluate_masks(pred, ds)
    remove_temp_files(pred / "eval")
    write_mask_report(res, ds.classes, pred / "eval")
    result.done.append(("eval", time.time() - t0, False))
    log.info("fully-supervised reference: segmenter mIoU %.1f on %d %s images", res["mIoU"], len(ds), cfg.predict.split)
    from wsss.report import write_report

    result.report = write_report(run_dir, "seg", cfg.predict.split)
    return result
