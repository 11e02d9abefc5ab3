"""Stage 5, `wsss train-seg`: a DeepLab-family segmenter trained on the pseudo-masks (255 ignored), or on
the ground-truth masks as the fully-supervised reference (``train_seg.masks=gt``)
(:func:`wsss.engine.segmenter.train_segmenter`).

Output folder ``RUN/seg/`` (``RUN/seg_gt/`` for ground truth): ``segmenter.pt`` (weights + meta: arch,
spec, classes, normalisation, resize_long), ``checkpoint.pt`` (resume), ``log.csv`` (loss, lr, val mIoU
when the val split has masks, seconds per epoch).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.engine.segmenter import gt_mask_source, pseudo_mask_source, train_segmenter
from wsss.manifest import StageOutcome
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import folder_of, masks_folder, pseudo_mask_stage

log = logging.getLogger(__name__)


def _folder_key(folder: Path) -> str:
    """A key for an explicit mask folder: names, sizes and modification times of its PNGs."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.png")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def inputs(ctx: StageContext) -> dict[str, str]:
    c = ctx.cfg.train_seg
    keys = {"data": ctx.manifest_key("data", "no finished data stage in this run directory; run `wsss run CONFIG --to data` first")}
    if c.masks == "gt":
        return keys
    if c.mask_dir is not None:
        return keys | {"masks": _folder_key(Path(c.mask_dir))}
    stage, _ = pseudo_mask_stage(ctx.cfg)
    return keys | {stage: ctx.manifest_key(stage, f"no finished {stage} stage in this run directory; run `wsss {stage} CONFIG` first "
                                                  "(or set train_seg.mask_dir, or train_seg.masks=gt)")}


def section(cfg: Config) -> dict:
    return {k: v for k, v in config_to_dict(cfg.train_seg).items() if k not in ("workers", "threads", "device")} | {"seed": cfg.run.seed}


def run(ctx: StageContext) -> dict:
    cfg, c = ctx.cfg, ctx.cfg.train_seg
    train = ctx.split(cfg.data.train_split)
    if c.masks == "gt":
        masks = gt_mask_source(train)
    else:
        folder = Path(c.mask_dir) if c.mask_dir is not None else masks_folder(cfg, ctx.run_dir, pseudo_mask_stage(cfg)[0])
        masks = pseudo_mask_source(train, folder)
    val = ctx.split(cfg.data.val_split) if cfg.data.val_split else None
    result = train_segmenter(c, train, masks, ctx.out, val, seed=cfg.run.seed, resume=ctx.options.get("resume", True))
    f = result["final"]
    log.info("train-seg: %s on %s masks, %d epochs, final loss %s%s -> %s", c.arch, c.masks, result["epochs"], f.get("loss"),
             f", val mIoU {f['val_mIoU']:.1f}" if "val_mIoU" in f else "", ctx.out / "segmenter.pt")
    return {"segmenter": "segmenter.pt", "log": "log.csv", "final": f}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    final = outcome.manifest["outputs"].get("final", {})
    extras = ", ".join(f"{k} {v}" for k, v in final.items() if k in ("loss", "val_mIoU"))
    return (f"train-seg: {'up to date' if outcome.skipped else 'trained'} on {cfg.train_seg.masks} masks; {extras} -> "
            f"{folder_of(cfg, run_dir, 'train-seg') / 'segmenter.pt'}")
