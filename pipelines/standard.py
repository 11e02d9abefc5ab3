"""The standard flow: every stage of :data:`wsss.pipeline.table.STAGES` in order (data -> train-cls -> cam
-> expand -> crf -> affinity -> train-seg -> predict -> eval), then the run report and the gallery.

Each stage writes its folder of the run directory; a stage whose manifest key matches is skipped.
"""

from __future__ import annotations

import logging

from wsss.config import Config
from wsss.pipeline.checks import check_config
from wsss.pipeline.runner import RunResult, hold_run, run_flow
from wsss.pipeline.table import STAGE_NAMES, stage_folder

log = logging.getLogger(__name__)

#: Pipeline order.
STAGE_ORDER: tuple[str, ...] = STAGE_NAMES


def run(cfg: Config, from_stage: str | None = None, to_stage: str | None = None, force: tuple[str, ...] = (),
        report: bool = True) -> RunResult:
    """Run the stages from ``from_stage`` to ``to_stage`` (inclusive) into ``cfg.run.out_dir``; then,
    with ``report``, write the run report and gallery."""
    check_config(cfg)  # before the run directory is made
    with hold_run(cfg.run.out_dir):  # the report too: another run must not start between the stages and it
        return _run(cfg, from_stage, to_stage, force, report)


def _run(cfg: Config, from_stage: str | None, to_stage: str | None, force: tuple[str, ...], report: bool) -> RunResult:
    result = run_flow(cfg, STAGE_ORDER, from_stage, to_stage, force)
    if not report:
        return result
    from wsss.pipeline.report import write_report

    run_dir = result.run_dir
    result.report = write_report(run_dir, stage_folder("train-seg", cfg.train_seg.masks == "gt"), cfg.predict.split)
    log.info("report: %s, %s", run_dir / "report.json", run_dir / "report.html")
    if cfg.run.gallery_images and (run_dir / stage_folder("data") / "index.json").is_file():
        from wsss.pipeline.gallery import write_gallery

        result.gallery = write_gallery(run_dir, cfg.cam.split, limit=cfg.run.gallery_images)
    return result
