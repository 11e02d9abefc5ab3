"""The fully-supervised reference flow: data -> train-seg on the ground-truth masks of the training
split -> predict -> score, with the run's own segmenter recipe (``train_seg``/``predict`` sections).

Its outputs sit beside the weakly-supervised ones (``RUN/seg_gt/``, ``RUN/predict_gt/<split>/``), so the
report of the standard flow can show the ratio weakly- / fully-supervised.
"""

from __future__ import annotations

import logging
import time

from wsss.config import Config
from wsss.errors import DataError
from wsss.evaluation.masks import evaluate_masks, write_mask_report
from wsss.io import remove_temp_files
from wsss.pipeline.checks import check_config
from wsss.pipeline.runner import RunResult, hold_run, open_split, run_flow
from wsss.pipeline.table import EVAL_SUBFOLDER, folder_of

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
    check_config(cfg)
    with hold_run(cfg.run.out_dir):
        return _run(cfg, force)


def _run(cfg: Config, force: tuple[str, ...]) -> RunResult:
    result = run_flow(cfg, STAGE_ORDER[:-1], force=force, config_name="config_fully_supervised.yaml")
    t0 = time.time()
    run_dir = result.run_dir
    pred = folder_of(cfg, run_dir, "predict")
    ds = open_split(run_dir, cfg.predict.split)
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks to score the reference against", ds.root)
    res = evaluate_masks(pred, ds)
    remove_temp_files(pred / EVAL_SUBFOLDER)
    write_mask_report(res, ds.classes, pred / EVAL_SUBFOLDER)
    result.done.append(("eval", time.time() - t0, False))
    log.info("fully-supervised reference: segmenter mIoU %.1f on %d %s images", res["mIoU"], len(ds), cfg.predict.split)
    from wsss.pipeline.report import write_report

    result.report = write_report(run_dir, "seg", cfg.predict.split)
    return result
