"""The self-training flow: the standard flow, then one round of self-training. The round-0 segmenter
predicts the training split (multi-scale + flip as ``predict``, then the dense CRF, each photo restricted
to background + its image-level labels: ``RUN/predict/<train split>/``), and those masks train the same
segmenter recipe again in ``RUN/self_training/`` (its own run folder: data, seg, predict, eval, report),
scored on ``predict.split``.

Only image-level labels are used: ground truth is read by evaluation alone, as in the standard flow.
"""

from __future__ import annotations

import logging

from wsss.config import Config
from wsss.io import write_json
from wsss.pipeline.checks import check_config
from wsss.pipeline.runner import RunResult, dataset_root, hold_run, run_flow
from wsss.pipeline.table import folder_of
from wsss.pipelines.standard import run as run_standard

log = logging.getLogger(__name__)

#: the round's stages, in its own run folder
STAGE_ORDER: tuple[str, ...] = ("data", "train-seg", "predict", "eval")
#: the round's run folder, inside the run directory
SUBFOLDER = "self_training"


def train_prediction_config(cfg: Config) -> Config:
    """``cfg`` with ``predict`` set to make the next round's pseudo-masks: the training split, the CRF,
    the image-level labels, no overlays."""
    c = cfg.model_copy(deep=True)
    c.predict.split, c.predict.crf, c.predict.labels_only, c.predict.overlay = cfg.data.train_split, True, True, False
    return c


def round_config(cfg: Config) -> Config:
    """The round's config: its own run folder, the round-0 predictions on the training split as masks, the
    same dataset (a synthetic one is read where round 0 generated it)."""
    run_dir = cfg.run.out_dir
    c = cfg.model_copy(deep=True)
    c.run.out_dir = run_dir / SUBFOLDER
    c.train_seg.mask_dir = folder_of(train_prediction_config(cfg), run_dir, "predict")
    if cfg.data.root is None:
        c.data.root, c.data.source = dataset_root(cfg.data, run_dir), "voc"
    return c


def run(cfg: Config, force: tuple[str, ...] = ()) -> RunResult:
    """Round 0 (the standard flow) and round 1 into ``cfg.run.out_dir``; ``force`` names stages of round 0
    to redo (everything after them, round 1 included, follows). Returns round 1's result; its report holds
    both rounds' segmenter scores (``metrics.seg`` and ``metrics.seg_round0``)."""
    check_config(cfg)
    with hold_run(cfg.run.out_dir):
        first = run_standard(cfg, force=force)
        run_flow(train_prediction_config(cfg), ("predict",), force=("predict",) if force else (),
                 config_name="config_self_training.yaml")
        rcfg = round_config(cfg)
        result = run_flow(rcfg, STAGE_ORDER, force=("train-seg",) if force else ())
        from wsss.pipeline.report import write_report

        result.report = write_report(rcfg.run.out_dir, "seg", cfg.predict.split)
        before = first.report.get("metrics", {}).get("seg", {}).get("mIoU")
        result.report.setdefault("metrics", {})["seg_round0"] = first.report.get("metrics", {}).get("seg", {})
        write_json(rcfg.run.out_dir / "report.json", result.report)  # the round's report, with round 0's score beside it
        result.done = first.done + [("self-training", sum(s for _, s, _ in result.done), all(k for _, _, k in result.done))]
        after = result.report["metrics"].get("seg", {}).get("mIoU")
        if before is not None and after is not None:
            log.info("self-training: segmenter mIoU %.1f -> %.1f on %s", before, after, cfg.predict.split)
        return result
