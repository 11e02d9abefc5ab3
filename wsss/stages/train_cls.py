"""Stage 1, `wsss train-cls`: the multi-label classifier trained from image-level labels only
(:func:`wsss.engine.classifier.train_classifier`).

Output folder ``RUN/cls/``: ``classifier.pt`` (weights + meta: backbone, output_stride, classes,
normalisation), ``checkpoint.pt`` (resume), ``log.csv`` (loss, lr, val mAP / F1, seconds per epoch).
An interrupted training (``checkpoint.pt`` without a finished manifest) is resumed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.engine.classifier import train_classifier
from wsss.manifest import StageOutcome
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import folder_of

log = logging.getLogger(__name__)


def inputs(ctx: StageContext) -> dict[str, str]:
    return {"data": ctx.manifest_key("data", "no finished data stage in this run directory; run `wsss run CONFIG --to data` first")}


def section(cfg: Config) -> dict:
    return config_to_dict(cfg.train_cls) | {"seed": cfg.run.seed}


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    train = ctx.split(cfg.data.train_split)
    val = ctx.split(cfg.data.val_split) if cfg.data.val_split else None
    summary = train_classifier(cfg.train_cls, train, ctx.out, val, seed=cfg.run.seed, resume=ctx.options.get("resume", True))
    f = summary["final"]
    log.info("train-cls: %d epochs, final loss %s%s -> %s", summary["epochs"], f.get("loss"),
             f", val mAP {f['val_mAP']:.3f}" if "val_mAP" in f else "", ctx.out / "classifier.pt")
    return {"classifier": "classifier.pt", "log": "log.csv", "final": f}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    final = outcome.manifest["outputs"].get("final", {})
    extras = ", ".join(f"{k} {v}" for k, v in final.items() if k.startswith("val_") or k == "loss")
    return f"train-cls: {'up to date' if outcome.skipped else 'trained'}; {extras} -> {folder_of(cfg, run_dir, 'train-cls') / 'classifier.pt'}"
