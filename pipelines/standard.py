"""The standard flow: data -> train-cls -> cam -> expand -> crf -> affinity -> train-seg -> predict -> eval.

Each stage writes its folder of the run directory; a stage whose manifest key matches is skipped.
At the end it writes ``report.json``/``report.html`` and a gallery (``run.gallery_images``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from wsss.config import Config, save_config
from wsss.io import remove_temp_files
from wsss.manifest import StageOutcome
from wsss.stages.affinity import run_affinity_stage
from wsss.stages.cam import run_cam_stage
from wsss.stages.crf import run_crf_stage
from wsss.stages.data import run_data_stage
from wsss.stages.expand import run_expand_stage
from wsss.stages.predict import run_predict_stage
from wsss.stages.eval import run_eval_stage
from wsss.stages.train_cls import run_train_cls_stage
from wsss.stages.train_seg import run_train_seg_stage

log = logging.getLogger(__name__)

#: Pipeline order.
STAGE_ORDER: tuple[str, ...] = ("data", "train-cls", "cam", "expand", "crf", "affinity", "train-seg", "predict", "eval")


@dataclass
class RunResult:
    run_dir: Path
    done: list[tuple[str, float, bool]] = field(default_factory=list)  # (stage, seconds, skipped)
    disabled: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    gallery: Path | None = None


def _expand(cfg: Config, run_dir: Path, force: bool) -> StageOutcome | None:
    if not cfg.expand.enabled:
        log.info("stage expand: disabled (expand.enabled=false)")
        return None
    return run_expand_stage(cfg, run_dir, force=force)


def _affinity(cfg: Config, run_dir: Path, force: bool) -> StageOutcome | None:
    if not cfg.affinity.enabled:
        log.info("stage affinity: disabled (affinity.enabled=false)")
        return None
    return run_affinity_stage(cfg, run_dir, force=force)


def _stages() -> dict[str, Callable[[Config, Path, bool], StageOutcome | None]]:
    return {
        "data": lambda cfg, run_dir, force: run_data_stage(cfg.data, run_dir, force=force),
        "train-cls": lambda cfg, run_dir, force: run_train_cls_stage(cfg, run_dir, force=force),
        "cam": lambda cfg, run_dir, force: run_cam_stage(cfg, run_dir, force=force),
        "expand": _expand,
        "crf": lambda cfg, run_dir, force: run_crf_stage(cfg, run_dir, force=force),
        "affinity": _affinity,
        "train-seg": lambda cfg, run_dir, force: run_train_seg_stage(cfg, run_dir, force=force),
        "predict": lambda cfg, run_dir, force: run_predict_stage(cfg, run_dir, force=force),
        "eval": lambda cfg, run_dir, force: run_eval_stage(cfg, run_dir, force=force),
    }


def run(cfg: Config, from_stage: str | None = None, to_stage: str | None = None, force: tuple[str, ...] = (),
        report: bool = True) -> RunResult:
    """Run the stages from ``from_stage`` to ``to_stage`` (inclusive) into ``cfg.run.out_dir``; then,
    with ``report``, write the run report and gallery."""
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(run_dir, recursive=False)  # a killed report or config write; stages clean their own folders
    save_config(cfg, run_dir / "config.yaml")
    order = list(STAGE_ORDER)
    lo = order.index(from_stage) if from_stage else 0
    hi = order.index(to_stage) if to_stage else len(order) - 1
    forced_from = min((order.index(s) for s in force), default=len(order))
    result = RunResult(run_dir)
    stages = _stages()
    for i, name in enumerate(order[lo : hi + 1], start=lo):
        fn = stages[name]
        t0 = time.time()
        outcome = fn(cfg, run_dir, i >= forced_from)
        if outcome is None:
            result.disabled.append(name)
            continue
        result.done.append((name, time.time() - t0, outcome.skipped))
    if not report:
        return result
    from wsss.report import write_report
    from wsss.stages.train_seg import seg_folder

    result.report = write_report(run_dir, seg_folder(cfg.train_seg), cfg.predict.split)
    log.info("report: %s, %s", run_dir / "report.json", run_dir / "report.html")
    if cfg.run.gallery_images and (run_dir / "data" / "index.json").is_file():
        from wsss.gallery import write_gallery

        result.gallery = write_gallery(run_dir, cfg.cam.split, limit=cfg.run.gallery_images)
    return result
