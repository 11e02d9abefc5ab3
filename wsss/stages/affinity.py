"""Stage 4b, `wsss affinity`: learn pixel affinities from confident pseudo-masks, random-walk the maps
along them, refine the walked maps with the CRF into new pseudo-masks (:mod:`wsss.affinity.train`,
:mod:`wsss.crf.pool`).

Reads ``RUN/cls/classifier.pt`` (its backbone, frozen, gives the features) and a pair of pseudo-masks
(the training labels: only their confident pixels) and maps: ``RUN/crf/*.png`` with the maps the crf
stage refined (``RUN/cam`` or ``RUN/expand``), or, when the seg-maps stage is enabled, its
``RUN/segmaps/masks`` and ``RUN/segmaps/maps``. Never reads ground truth. Output folder ``RUN/affinity/``: ``head.pt`` (checkpoint.pt
while training), ``log.csv``, ``maps/<id>.npz`` (the format of RUN/cam), ``masks/<id>.png`` +
``stats.csv`` (what train-seg reads). Training resumes per epoch, the walk and the CRF per file. The
head and the walked maps carry their own keys (``.head_key``, ``.walk_key``): a change of the final
CRF's thresholds alone re-runs only the CRF, one of the walk's settings (beta, steps, normalise) the
walk and the CRF but not the training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from wsss.affinity.train import load_affinity_head, train_affinity_head, walk_maps
from wsss.config import Config, config_hash, config_to_dict
from wsss.crf.pool import UNKEYED, refine_folder
from wsss.engine.core import resolve_device
from wsss.errors import WsssError
from wsss.manifest import StageOutcome, keep_keyed_outputs
from wsss.models.checkpoint import load_classifier
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import cam_source, get_stage, maps_folder, masks_folder, refined_stage

log = logging.getLogger(__name__)


def sources(cfg: Config, run_dir: Path) -> tuple[str, Path, Path]:
    """(name, pseudo-mask folder, map folder) the stage learns from and walks: the seg-maps stage's when
    it is enabled, else the crf stage's masks and the maps it refined."""
    refined = refined_stage(cfg)
    maps_stage = refined if refined == "seg-maps" else cam_source(cfg, run_dir)
    return maps_stage, masks_folder(cfg, run_dir, refined), maps_folder(cfg, run_dir, maps_stage)


def inputs(ctx: StageContext) -> dict[str, str]:
    refined = refined_stage(ctx.cfg)
    hint = f"affinity needs the trained classifier and the {refined} stage's pseudo-masks and maps; run `wsss {refined} CONFIG` first"
    keys = {"classifier": ctx.manifest_key("train-cls", hint), "crf": ctx.manifest_key("crf", hint)}
    if refined == "seg-maps":
        return keys | {"seg-maps": ctx.manifest_key("seg-maps", hint)}
    source = cam_source(ctx.cfg, ctx.run_dir)
    return keys | {source: ctx.manifest_key(source, hint)}


def section(cfg: Config) -> dict:
    return {"affinity": {k: v for k, v in config_to_dict(cfg.affinity).items() if k != "device"},
            "crf": {k: v for k, v in config_to_dict(cfg.crf).items() if k not in UNKEYED}, "seed": cfg.run.seed}


HEAD_MARKER, WALK_MARKER = ".head_key", ".walk_key"
#: what the walk and the head's training produce (the rest of the table row's ``keep``), each under its own key
WALK_OUTPUTS = (get_stage("affinity").maps,)
HEAD_OUTPUTS = tuple(n for n in get_stage("affinity").keep if n not in (*WALK_OUTPUTS, HEAD_MARKER, WALK_MARKER))
#: affinity settings only the walk reads: changing them keeps the trained head
WALK_ONLY = ("beta", "steps", "normalise")


def _keys(ctx: StageContext) -> tuple[str, str]:
    """The keys of the head and of the walked maps. The head's: the stage's inputs, the seed and every
    affinity setting the training reads; the walk's: the head's key and the walk's own settings. Neither
    holds the final CRF's thresholds (the crf kernels are not in them at all), so trying other thresholds
    re-runs only the CRF, and another walk length re-runs the walk but not the training."""
    a = {k: v for k, v in config_to_dict(ctx.cfg.affinity).items() if k not in ("device", "fg_threshold", "low_threshold")}
    head = config_hash({"inputs": inputs(ctx), "affinity": {k: v for k, v in a.items() if k not in WALK_ONLY}, "seed": ctx.cfg.run.seed})
    return head, config_hash({"head": head, "walk": {k: a[k] for k in WALK_ONLY}})


def run(ctx: StageContext) -> dict:
    cfg, a, out = ctx.cfg, ctx.cfg.affinity, ctx.out
    head_key, walk_key = _keys(ctx)
    if keep_keyed_outputs(out, HEAD_MARKER, HEAD_OUTPUTS, head_key, ctx.force) and (out / "head.pt").is_file():
        log.info("affinity: the head trained with the same settings and inputs is reused")
    if keep_keyed_outputs(out, WALK_MARKER, WALK_OUTPUTS, walk_key, ctx.force) and (out / "maps").is_dir():
        log.info("affinity: walked maps made with the same head and walk settings are reused (only the final CRF "
                 "thresholds differ or a run resumes)")
    source, mask_dir, map_dir = sources(cfg, ctx.run_dir)
    ds = ctx.split(cfg.cam.split)
    device = resolve_device(a.device)
    model, meta = load_classifier(ctx.folder("train-cls") / "classifier.pt", device)
    backbone = model.backbone
    if backbone.prefers_channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if not backbone.level_channels:
        raise WsssError(f"backbone '{meta.get('backbone', type(backbone).__name__)}' has no multi-level features for the affinity stage")
    stage = get_stage("affinity")
    maps, masks = out / stage.maps, out / stage.masks
    t0 = time.perf_counter()
    if (out / "head.pt").is_file():
        train = {"epochs": a.epochs, "seconds": 0.0, "final_loss": None}
    else:
        train = train_affinity_head(backbone, ds, mask_dir, a, meta["mean"], meta["std"], device, out,
                                    cfg.run.seed)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = load_affinity_head(out / "head.pt", device)
    walked = walk_maps(backbone, head, ds, map_dir, maps, a, meta["mean"], meta["std"], device)
    t_walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, warnings = refine_folder(ds, maps, masks, a.crf_settings(cfg.crf), "affinity")
    t_crf = time.perf_counter() - t0
    log.info("affinity: %d images from %s; head %.0f s, walk %.0f s, crf %.0f s; foreground %.1f%%, ignored %.1f%% -> %s",
             len(ds), source, t_train, t_walk, t_crf, 100 * stats["mean_fg_share"], 100 * stats["mean_ignore_share"], masks)
    return {"images": len(ds), "source": source, "walked": walked, "warnings": warnings, "train_s": round(t_train, 1), "walk_s": round(t_walk, 1),
            "crf_s": round(t_crf, 1), "final_loss": train["final_loss"], **{k: round(v, 4) for k, v in stats.items()}}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return (f"affinity: {'up to date' if outcome.skipped else 'done'}; {o['images']} masks from {o['source']} walked along learned "
            f"affinities, foreground {100 * o['mean_fg_share']:.1f}%, ignored {100 * o['mean_ignore_share']:.1f}% -> "
            f"{masks_folder(cfg, run_dir, 'affinity')}")
