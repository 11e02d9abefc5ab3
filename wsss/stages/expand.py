"""Stage 3, `wsss expand`: fine-tune the stage-1 classifier with expansion methods and extract new maps
(:func:`wsss.expand.rounds.run_expand`, which documents the rounds and the folder layout).

Output folder ``RUN/expand/``: ``<id>.npz`` in the format of ``RUN/cam/`` (so `wsss eval cam` and
`wsss crf` take either), ``round_<r>/``, and the fine-tuning and extraction seconds of each round in the
manifest. Under torchrun every rank fine-tunes and extracts its share; rank 0 writes the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.engine.core import rank_device, resolve_device
from wsss.expand.rounds import finetune_config, run_expand
from wsss.manifest import StageOutcome
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import folder_of

log = logging.getLogger(__name__)


def inputs(ctx: StageContext) -> dict[str, str]:
    hint = "expand needs the trained classifier and its CAMs; run `wsss train-cls` and `wsss cam` first"
    return {"classifier": ctx.manifest_key("train-cls", hint), "cam": ctx.manifest_key("cam", hint)}


def section(cfg: Config) -> dict:
    return {"expand": config_to_dict(cfg.expand), "finetune": config_to_dict(finetune_config(cfg)),
            "cam": config_to_dict(cfg.cam), "seed": cfg.run.seed}


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    train = ctx.split(cfg.cam.split)
    val = ctx.split(cfg.data.val_split) if cfg.data.val_split else None
    device = rank_device(resolve_device(cfg.cam.device))
    report = run_expand(cfg, train, val, ctx.folder("train-cls") / "classifier.pt", ctx.folder("cam"), ctx.out, device)
    log.info("expand: %s, %d round(s), fine-tuning %.0f s, extraction %.0f s -> %s", "+".join(cfg.expand.methods) or "plain fine-tune",
             len(report["rounds"]), report["finetune_s"], report["extract_s"], ctx.out)
    return {"images": len(train), "methods": cfg.expand.methods, **report}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return (f"expand: {'up to date' if outcome.skipped else 'done'}; {'+'.join(o['methods'])}, {len(o['rounds'])} round(s), "
            f"fine-tuning {o['finetune_s']:.0f} s; {o['images']} images -> {folder_of(cfg, run_dir, 'expand')}")
