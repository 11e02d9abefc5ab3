"""Stage 2, `wsss cam`: class activation maps of every image's labelled classes.

Output folder ``RUN/cam/`` (also the format of ``RUN/expand/``)::

    <id>.npz       classes: int16 (k,) class ids (1..K); cam: float16 (k, H, W) in [0, 1], max-normalised
                   per class, at the image's resolution. Load with ``np.load(path)`` (no pickle).
    manifest.json  stage manifest (written last: its presence means the folder is complete)
    config.yaml    the resolved cam section

Resumable: files are written atomically, so a re-run with the same key keeps the finished ``.npz``
files and computes only the missing ones; a changed key clears the folder first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wsss.cam.extract import extract_cams
from wsss.cam.methods import create_cam_method
from wsss.config import CamConfig, config_hash, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.camfile import save_cam
from wsss.errors import WsssError
from wsss.log import progress
from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.models.inference import fold_batchnorm
from wsss.stages.train_cls import use_channels_last

if TYPE_CHECKING:
    from wsss.config import Config
    from wsss.shard import Shard

log = logging.getLogger(__name__)


def run_cam_extraction(model, ds: Dataset, cfg: CamConfig, out_dir: str | Path, device: torch.device,
                       mean, std) -> dict:
    """Write ``<id>.npz`` for every image of ``ds`` missing from ``out_dir``; returns counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, s in enumerate(ds) if not (out_dir / f"{s.id}.npz").is_file()]
    nhwc = use_channels_last(cfg.channels_last, model)
    if cfg.fold_bn and cfg.target_layer == "features":
        model = fold_batchnorm(model)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    method = create_cam_method(cfg.method, model, cfg.target_layer)
    n_done = len(ds) - len(todo)
    if n_done:
        log.info("cam: %d of %d images already done, resuming", n_done, len(ds))

    def images():
        for i in todo:
            s = ds[i]
            yield s.id, ds.read_image(i), s.labels

    bar = progress(total=len(todo), desc=f"cam {cfg.method}", unit="img")
    for sid, classes, cams in extract_cams(method, images(), mean=mean, std=std, scales=cfg.scales, flip=cfg.flip,
                                           batch_size=cfg.batch_size, batch_pixels=cfg.batch_pixels, resize_long=cfg.resize_long, device=device,
                                           channels_last=nhwc):
        save_cam(out_dir / f"{sid}.npz", classes, cams)
        bar.update(1)
    bar.close()
    return {"images": len(ds), "computed": len(todo), "reused": n_done}


def run_cam_stage(cfg: "Config", run_dir: str | Path, force: bool = False, shard: "Shard | None" = None) -> StageOutcome:
    """Pipeline entry: CAMs of ``cam.split`` from ``RUN/cls/classifier.pt`` into ``RUN/cam/``; with
    ``shard`` only that shard's images (see :mod:`wsss.shard`)."""
    from wsss.shard import check_shards, shard_ids, write_shard_record

    from wsss.stages.data import open_split
    from wsss.stages.train_cls import load_classifier, resolve_device

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "cam"
    cls_man = read_manifest(run_dir / "cls")
    if cls_man is None or not (run_dir / "cls" / "classifier.pt").is_file():
        raise WsssError("no trained classifier in this run directory; run `wsss train-cls CONFIG` first", run_dir)
    section = config_to_dict(cfg.cam)
    chash = config_hash(section)
    inputs = {"classifier": cls_man["key"]}
    key = stage_key("cam", chash, inputs)
    done = finished_outcome(out, "cam", chash, inputs, force)
    if done is not None:
        return done
    prepare_output_folder(out, key, force, "*.npz", "shards")
    save_config(cfg.cam, out / "config.yaml")
    device = resolve_device(cfg.cam.device)
    model, meta = load_classifier(run_dir / "cls" / "classifier.pt", device)
    ds = open_split(run_dir, cfg.cam.split)
    if shard is not None:
        sub = ds.subset(shard_ids([s.id for s in ds], shard))
        counts = run_cam_extraction(model, sub, cfg.cam, out, device, meta["mean"], meta["std"])
        write_shard_record(out, "cam", key, shard, [s.id for s in sub])
        log.info("cam: shard %d/%d: %d images (%d computed) -> %s", *shard, len(sub), counts["computed"], out)
        return StageOutcome({"stage": "cam", "shard": list(shard), "outputs": counts}, skipped=False)
    n_shards = check_shards(out, key, [s.id for s in ds])
    counts = run_cam_extraction(model, ds, cfg.cam, out, device, meta["mean"], meta["std"])
    man = write_manifest(out, "cam", section, chash, inputs, {"format": "npz: classes int16 (k,), cam float16 (k,H,W)",
                                                             **counts, "shards": n_shards}, started)
    log.info("cam: %d images (%d computed, %d reused), method %s, %d scales%s -> %s", counts["images"], counts["computed"],
             counts["reused"], cfg.cam.method, len(cfg.cam.scales), " + flip" if cfg.cam.flip else "", out)
    return StageOutcome(man, skipped=False)
