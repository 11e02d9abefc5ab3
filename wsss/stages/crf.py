"""Stage 4, `wsss crf`: dense-CRF pseudo-masks from the CAMs, plain or expanded (:mod:`wsss.crf.pool`);
`wsss crf --sweep` chooses settings on a labelled subset (:mod:`wsss.crf.sweep`).

Output folder ``RUN/crf/``: ``<id>.png`` (palette PNG, VOC colours: 0 background, 1..K classes, 255
ignore), ``stats.csv`` (id, classes, fg_share, ignore_share per image). Images are refined in parallel
worker processes; a killed run leaves no half file and a re-run computes only the missing ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.crf.auto import auto_thresholds
from wsss.crf.pool import UNKEYED, crf_jobs, empty_masks_warning, resolve_workers, run_crf, write_stats
from wsss.crf.sweep import sweep_crf
from wsss.errors import WsssError
from wsss.manifest import StageOutcome, read_manifest
from wsss.pipeline.runner import StageContext, open_split
from wsss.pipeline.table import cam_source, folder_of, get_stage, maps_folder

log = logging.getLogger(__name__)


def inputs(ctx: StageContext) -> dict[str, str]:
    source = cam_source(ctx.cfg, ctx.run_dir)
    cmd = "wsss cam" if source == "cam" else "wsss expand"
    return {source: ctx.manifest_key(source, f"no finished {source} stage in this run directory; run `{cmd} CONFIG` first")}


def section(cfg: Config) -> dict:
    return {k: v for k, v in config_to_dict(cfg.crf).items() if k not in UNKEYED}


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    source = cam_source(cfg, ctx.run_dir)
    full = ctx.split(cfg.cam.split)
    ds = ctx.select(full)
    workers = ctx.options.get("workers")
    n_workers = resolve_workers(cfg.crf.workers if workers is None else workers)
    maps = maps_folder(cfg, ctx.run_dir, source)
    crf, chosen = cfg.crf, {}
    if crf.thresholds == "auto":  # from the maps of the whole split, so every shard picks the same
        chosen = auto_thresholds([maps / f"{s.id}.npz" for s in full], full.num_classes, crf.auto_images)
        crf = crf.model_copy(update={k: chosen[k] for k in ("fg_threshold", "low_threshold")})
        log.info("crf: thresholds chosen from %d images' maps (no mask read): fg_threshold %.3f, low_threshold %.3f",
                 chosen["images"], chosen["fg_threshold"], chosen["low_threshold"])
    jobs, n_done = crf_jobs(ds, maps, ctx.out, split=full)
    if ctx.shard is not None:
        run_crf(jobs, crf, full.num_classes, n_workers)
        return {"images": len(ds), "computed": len(jobs)}
    if n_done:
        log.info("crf: %d of %d images already done, resuming", n_done, len(ds))
    t0 = time.perf_counter()
    run_crf(jobs, crf, ds.num_classes, n_workers)
    secs = time.perf_counter() - t0
    stats = write_stats(ctx.out, [s.id for s in ds])
    log.info("crf: %d images (%d computed, %d reused) from %s, %s mode, %d workers; foreground %.1f%%, ignored %.1f%% -> %s",
             len(ds), len(jobs), n_done, source, cfg.crf.mode, n_workers, 100 * stats["mean_fg_share"],
             100 * stats["mean_ignore_share"], ctx.out)
    warnings = empty_masks_warning(stats, len(ds))
    for w in warnings:
        log.warning("crf: %s", w)
    return {"images": len(ds), "computed": len(jobs), "reused": n_done, "source": source, "workers": n_workers, "shards": ctx.shards,
            "seconds_per_image": round(secs / len(jobs), 4) if jobs else None, **{k: round(v, 4) for k, v in stats.items()},
            "warnings": warnings, **({"auto_thresholds": chosen} if chosen else {})}


def sweep(cfg: Config, run_dir: Path, workers: int | None = None, maps: str = "crf") -> dict:
    """`wsss crf --sweep`: the crf.sweep grid on the maps the crf stage refines (``maps="crf"``, into
    ``RUN/crf_sweep/``) or on the maps of a later stage that runs its own CRF (``maps="seg-maps"`` or
    ``"affinity"``: confidence mode from that section's thresholds, into ``RUN/crf_sweep_<section>/``)."""
    if maps in ("seg-maps", "affinity"):
        stage = get_stage(maps)
        if read_manifest(folder_of(cfg, run_dir, maps)) is None:
            raise WsssError(f"no finished {maps} stage in this run directory to sweep on; run `wsss {maps} CONFIG` first", run_dir)
        section = stage.section
        source, crf, out = maps, getattr(cfg, section).crf_settings(cfg.crf), run_dir / f"crf_sweep_{section}"
    elif maps == "crf":
        source, crf, out, section = cam_source(cfg, run_dir), cfg.crf, run_dir / "crf_sweep", "crf"
        if read_manifest(maps_folder(cfg, run_dir, source)) is None:
            raise WsssError(f"no finished {source} stage in this run directory to sweep on", run_dir)
    else:
        raise WsssError(f"unknown maps to sweep on '{maps}' (crf, seg-maps, affinity)")
    ds = open_split(run_dir, cfg.cam.split)
    return sweep_crf(crf, ds, maps_folder(cfg, run_dir, source), out, source, workers=workers, threshold_section=section)


def summary(cfg: Config, run_dir: Path, outcome: StageOutcome) -> str:
    o = outcome.manifest["outputs"]
    return (f"crf: {'up to date' if outcome.skipped else 'done'}; {o['images']} masks from {o['source']}, "
            f"foreground {100 * o['mean_fg_share']:.1f}%, ignored {100 * o['mean_ignore_share']:.1f}% -> {folder_of(cfg, run_dir, 'crf')}")
