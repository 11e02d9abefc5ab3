"""Stage 6, `wsss predict`: the run's segmenter on ``predict.split`` (:func:`wsss.inference.predict_items`).

Output folder ``RUN/predict/<split>/`` (``RUN/predict_gt/<split>/`` for the ground-truth segmenter):
``<id>.png`` (palette PNG, class ids 0..K-1), ``overlay/<id>.jpg`` (the photo with the mask colours
blended over its foreground). PNGs are written atomically; a killed run resumes with the missing images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wsss.config import Config, config_hash, config_to_dict
from wsss.errors import WsssError
from wsss.inference import predict_items, stored_cooccurrence
from wsss.io import file_digest
from wsss.manifest import StageOutcome, prepare_output_folder, stage_key, write_manifest
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
    cooccur = stored_cooccurrence(meta, path) if p.exclusive_below is not None and not p.labels_only else None
    ds = ctx.select(full)
    stats = predict_items(model, [(s.id, s.image) for s in ds], ctx.out, p, p.resize_long or meta.get("resize_long"),
                          cfg.crf if p.crf else None, labels={s.id: s.labels for s in ds} if p.labels_only else None,
                          cooccur=cooccur)
    if ctx.shard is not None:
        return stats
    log.info("predict: %d %s images (%d computed, %d reused), scales %s%s%s -> %s", stats["images"], p.split, stats["computed"],
             stats["reused"], p.scales, " + flip" if p.flip else "", " + CRF" if p.crf else "", ctx.out)
    return stats | {"shards": ctx.shards}


def predict_paths(cfg: Config, model_path: Path, items: list[tuple[str, Path]], out: Path, force: bool = False) -> dict:
    """`wsss predict --input/--model/--out`: ``items`` (``(id, image path)``) with the segmenter at
    ``model_path`` into ``out``. The folder is keyed like a stage's: predictions of another model or other
    settings found there are cleared first (``force``: always), and its ``manifest.json`` names the model.
    Unreadable images are skipped (listed in ``skipped``). Returns counts."""
    started = time.time()
    model, meta = load_segmenter(model_path)
    cooccur = stored_cooccurrence(meta, model_path) if cfg.predict.exclusive_below is not None else None
    settings = section(cfg)
    inputs = {"model": file_digest(model_path)}
    chash = config_hash(settings)
    prepare_output_folder(out, stage_key("predict", chash, inputs), force)
    stats = predict_items(model, items, out, cfg.predict, cfg.predict.resize_long or meta.get("resize_long"),
                          cfg.crf if cfg.predict.crf else None, skip_done=True, skip_unreadable=True,
                          cooccur=cooccur)
    write_manifest(out, "predict", settings, chash, inputs, {**stats, "model": str(model_path)}, started)
    return stats


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return f"predict: {o['images']} {cfg.predict.split} images ({o['computed']} computed) -> {folder_of(cfg, run_dir, 'predict')}"
