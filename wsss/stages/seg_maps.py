"""Stage 4a', `wsss seg-maps`: maps from a segmenter trained on the crf stage's pseudo-masks
(:func:`wsss.engine.segmenter.train_segmenter`, :func:`wsss.inference.write_label_maps`, :mod:`wsss.crf.pool`).

A segmenter trained per pixel on the whole train set learns what the confident parts of the masks have
in common and marks them where a photo's CAM missed them (the body of a dog whose head the CAM found).
Its class probabilities on the train photos, renormalised over background and each photo's labels, are
the new maps; with ``segmaps.merge_cams`` each is the larger of them and the CAMs the crf stage read,
which gives back small objects the segmenter misses. The CRF in confidence mode (this section's
thresholds) turns them into pseudo-masks.
Reads the images and ``RUN/crf/*.png`` (never ground truth). Output folder ``RUN/segmaps/``:
``segmenter/`` (segmenter.pt, checkpoint.pt while training, log.csv, config.yaml: the train_seg
settings it was trained with), ``maps/<id>.npz`` (the format of RUN/cam),
``masks/<id>.png`` + ``stats.csv`` (what the affinity stage learns from, or train-seg reads without it).
Training resumes per epoch, the maps and the CRF per file. The segmenter and the maps carry their own
keys (``.seg_key``, ``.maps_key``): new CRF thresholds re-run only the CRF, new inference scales the maps
and the CRF but not the training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wsss.config import Config, config_hash, config_to_dict
from wsss.crf.pool import UNKEYED, refine_folder
from wsss.engine.core import resolve_device
from wsss.engine.segmenter import pseudo_mask_source, train_segmenter
from wsss.inference import write_label_maps
from wsss.manifest import StageOutcome, keep_keyed_outputs
from wsss.models.checkpoint import load_segmenter
from wsss.pipeline.runner import StageContext
from wsss.pipeline.table import cam_source, get_stage, maps_folder, masks_folder

log = logging.getLogger(__name__)

SEG_MARKER, MAPS_MARKER = ".seg_key", ".maps_key"
#: subfolder of the trained segmenter (segmenter.pt, checkpoint.pt, log.csv, its train_seg config.yaml)
SEGMENTER = "segmenter"
MAPS_OUTPUTS = (get_stage("seg-maps").maps,)
SEG_OUTPUTS = tuple(n for n in get_stage("seg-maps").keep if n not in (*MAPS_OUTPUTS, SEG_MARKER, MAPS_MARKER))
#: settings only the maps read: changing them keeps the trained segmenter
MAPS_ONLY = ("scales", "flip", "resize_long", "merge_cams")
#: train_seg settings the segmenter here does not depend on (where the final segmenter's masks come from; speed only)
SEG_UNKEYED = ("workers", "threads", "device", "masks", "mask_dir")
#: segmaps settings left out of its own part of the key: the device (speed only) and the training sizes, keyed
#: through the segmenter's effective train_seg settings (naming train_seg's own value there or leaving it out: one key)
SEGMAPS_UNKEYED = ("device", "train_resize_long", "crop_size")


def inputs(ctx: StageContext) -> dict[str, str]:
    hint = "seg-maps trains on the crf stage's pseudo-masks; run `wsss crf CONFIG` first"
    return {"data": ctx.manifest_key("data", hint), "crf": ctx.manifest_key("crf", hint)}


def section(cfg: Config) -> dict:
    seg = config_to_dict(cfg.segmaps.segmenter_settings(cfg.train_seg))
    return {"segmaps": {k: v for k, v in config_to_dict(cfg.segmaps).items() if k not in SEGMAPS_UNKEYED},
            "train_seg": {k: v for k, v in seg.items() if k not in SEG_UNKEYED} | {"seed": cfg.run.seed},
            "crf": {k: v for k, v in config_to_dict(cfg.crf).items() if k not in UNKEYED}}


def _keys(ctx: StageContext) -> tuple[str, str]:
    """The keys of the segmenter (inputs, seed, the segmenter's settings) and of the maps (the
    segmenter's key and the inference settings); neither holds the CRF's settings."""
    full = section(ctx.cfg)
    seg = config_hash({"inputs": inputs(ctx), "train_seg": full["train_seg"]})
    return seg, config_hash({"segmenter": seg, "maps": {k: full["segmaps"][k] for k in MAPS_ONLY}})


def run(ctx: StageContext) -> dict:
    cfg, s, out = ctx.cfg, ctx.cfg.segmaps, ctx.out
    seg_key, maps_key = _keys(ctx)
    seg_dir = out / SEGMENTER
    if keep_keyed_outputs(out, SEG_MARKER, SEG_OUTPUTS, seg_key, ctx.force) and (seg_dir / "segmenter.pt").is_file():
        log.info("seg-maps: the segmenter trained with the same settings and inputs is reused")
    if keep_keyed_outputs(out, MAPS_MARKER, MAPS_OUTPUTS, maps_key, ctx.force) and (out / "maps").is_dir():
        log.info("seg-maps: maps made by the same segmenter with the same settings are reused (only the CRF "
                 "thresholds differ or a run resumes)")
    ds = ctx.split(cfg.cam.split)
    seg_cfg = s.segmenter_settings(cfg.train_seg)
    t0 = time.perf_counter()
    if (seg_dir / "segmenter.pt").is_file():
        final = None
    else:
        masks = pseudo_mask_source(ds, masks_folder(cfg, ctx.run_dir, "crf"))
        final = train_segmenter(seg_cfg, ds, masks, seg_dir, None, seed=cfg.run.seed)["final"]
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    device = resolve_device(s.device)
    model, meta = load_segmenter(seg_dir / "segmenter.pt", device)
    stage = get_stage("seg-maps")
    maps, masks_dir = out / stage.maps, out / stage.masks
    merge_dir = maps_folder(cfg, ctx.run_dir, cam_source(cfg, ctx.run_dir)) if s.merge_cams else None
    size = s.resize_long or seg_cfg.resize_long or meta.get("resize_long")
    computed = write_label_maps(model, [(x.id, x.image, x.labels) for x in ds], maps, s.scales, s.flip, size, device,
                                batch_size=cfg.predict.batch_size, merge_dir=merge_dir)
    t_maps = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats, warnings = refine_folder(ds, maps, masks_dir, s.crf_settings(cfg.crf), "seg-maps")
    t_crf = time.perf_counter() - t0
    log.info("seg-maps: %d images; segmenter %.0f s, maps %.0f s (%d computed), crf %.0f s; foreground %.1f%%, ignored %.1f%% -> %s",
             len(ds), t_train, t_maps, computed, t_crf, 100 * stats["mean_fg_share"], 100 * stats["mean_ignore_share"], masks_dir)
    return {"images": len(ds), "maps_computed": computed, "warnings": warnings, "train_s": round(t_train, 1),
            "maps_s": round(t_maps, 1), "crf_s": round(t_crf, 1), "final": final,
            **{k: round(v, 4) for k, v in stats.items()}}


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return (f"seg-maps: {'up to date' if outcome.skipped else 'done'}; {o['images']} masks from a segmenter's maps, "
            f"foreground {100 * o['mean_fg_share']:.1f}%, ignored {100 * o['mean_ignore_share']:.1f}% -> "
            f"{masks_folder(cfg, run_dir, 'seg-maps')}")
