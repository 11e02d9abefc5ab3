"""Stage 6, `wsss predict`: the run's segmenter on ``predict.split`` (:func:`wsss.inference.predict_items`).

Output folder ``RUN/predict/<split>/`` (``RUN/predict_gt/<split>/`` for the ground-truth segmenter):
``<id>.png`` (palette PNG, class ids 0..K-1), ``overlay/<id>.jpg`` (the photo with the mask colours
blended over its foreground). PNGs are written atomically; a killed run resumes with the missing images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.errors import WsssError
from wsss.inference import predict_items
from wsss.manifest import StageOutcome
from wsss.models.checkpoint import load_segmenter
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import folder_of

log = logging.getLogger(__name__)


def segmenter_path(cfg: Config, run_dir: Path) -> Path:
    """The run's ``segmenter.pt`` (``seg/`` or ``seg_gt/`` by ``train_seg.masks``)."""
    return folder_of(cfg, run_dir, "train-seg") / "segmenter.pt"


def inputs(ctx: StageContext) -> dict[str, str]:
    return {"train-seg": ctx.manifest_key("train-seg", "no finished train-seg stage in this run directory; run `wsss train-seg CONFIG` first")}


def section(cfg: Config) -> dict:
    out = {k: v for k, v in config_to_dict(cfg.predict).items() if k not in ("device", "batch_size")}
    if cfg.predict.crf:
        out["crf"] = config_to_dict(cfg.crf)
    return out


def run(ctx: StageContext) -> dict:
    cfg, p = ctx.cfg, ctx.cfg.predict
    full = ctx.split(p.split)
    path = segmenter_path(cfg, ctx.run_dir)
    model, meta = load_segmenter(path)
    if list(meta["classes"]) != list(full.classes):
        raise WsssError(f"segmenter classes {meta['classes']} differ from the dataset's {full.classes}", path)
    ds = ctx.select(full)
    stats = predict_items(model, [(s.id, s.image) for s in ds], ctx.out, p, p.resize_long or meta.get("resize_long"),
                          cfg.crf if p.crf else None)
    if ctx.shard is not None:
        return stats
    log.info("predict: %d %s images (%d computed, %d reused), scales %s%s%s -> %s", stats["images"], p.split, stats["computed"],
             stats["reused"], p.scales, " + flip" if p.flip else "", " + CRF" if p.crf else "", ctx.out)
    return stats | {"shards": ctx.shards}


def predict_paths(cfg: Config, model_path: Path, items: list[tuple[str, Path]], out: Path, force: bool = False) -> dict:
    """`wsss predict --input/--model/--out`: ``items`` (``(id, image path)``) with the segmenter at
    ``model_path`` into ``out`` (``--force``: recompute the PNGs already there). Returns counts."""
    model, meta = load_segmenter(model_path)
    if force and out.is_dir():
        for f in out.glob("*.png"):
            f.unlink()
    return predict_items(model, items, out, cfg.predict, cfg.predict.resize_long or meta.get("resize_long"),
                         cfg.crf if cfg.predict.crf else None, skip_done=True)


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return f"predict: {o['images']} {cfg.predict.split} images ({o['computed']} computed) -> {folder_of(cfg, run_dir, 'predict')}"
