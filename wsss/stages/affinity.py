"""Stage 4b, `wsss affinity`: learn pixel affinities from the crf stage's confident pseudo-masks,
random-walk the maps along them, refine the walked maps with the CRF into new pseudo-masks.

Reads ``RUN/cls/classifier.pt`` (its backbone, frozen, gives the features), ``RUN/crf/*.png`` (the
training labels: only their confident pixels, 255 = unknown) and the maps the crf stage refined
(``RUN/cam`` or ``RUN/expand``). Never reads ground truth. Output folder ``RUN/affinity/``::

    head.pt          the trained affinity head (state dict + its shape), checkpoint.pt while training
    log.csv          loss and seconds per epoch
    maps/<id>.npz    random-walked maps, same format as RUN/cam (so `wsss eval cam` scores them)
    masks/<id>.png   pseudo-masks (palette PNG, 255 = ignore), stats.csv -- what train-seg reads
    manifest.json, config.yaml

Training resumes from its per-epoch checkpoint, the walk and the CRF per file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wsss.affinity import AffinityHead, affinity_loss, grid_labels, grid_size, pair_offsets, refine_maps
from wsss.camfile import load_cam, save_cam
from wsss.config import AffinityConfig, config_hash, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.data.transforms import to_tensor
from wsss.errors import DataError, WsssError
from wsss.io import read_mask
from wsss.log import progress
from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.training import load_checkpoint, poly_lr, resolve_device, save_checkpoint, write_log_csv

if TYPE_CHECKING:
    from wsss.config import Config

log = logging.getLogger(__name__)


def _input(image: np.ndarray, mean, std, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> normalised ``(1, 3, H, W)`` float32 on ``device``."""
    return to_tensor(image, mean, std)[None].to(device)


def embed(backbone, head: AffinityHead, x: torch.Tensor) -> torch.Tensor:
    """Embedding ``(D, h, w)`` of one normalised image ``x (1, 3, H, W)`` (backbone frozen, no gradient)."""
    if backbone.prefers_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        levels = backbone.forward_levels(x)
    return head(levels, grid_size(*x.shape[-2:]))[0]


def train_affinity_head(backbone, ds: Dataset, mask_dir: Path, cfg: AffinityConfig, mean, std, device: torch.device,
                        out_dir: Path, seed: int = 0) -> dict:
    """Train an :class:`AffinityHead` on the confident pixels of ``mask_dir/<id>.png`` (one image per
    step, random horizontal flips), checkpointing each epoch into ``out_dir``; writes ``head.pt`` and
    ``log.csv``. Resumes from ``checkpoint.pt``. Returns ``{"epochs", "seconds", "final_loss"}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.eval().to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    head = AffinityHead(backbone.level_channels, cfg.width, cfg.dim).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    offsets = pair_offsets(cfg.radius)
    ckpt_path = out_dir / "checkpoint.pt"
    start, rows = 0, []
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, "delete it (or use --force) to train the affinity head from scratch")
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["optimizer"])
        start, rows = ck["epoch"], ck["rows"]
        log.info("affinity: resumed from %s at epoch %d", ckpt_path, start)
    n_iter = cfg.epochs * len(ds)
    for epoch in range(start, cfg.epochs):
        rng = np.random.default_rng([seed, epoch])  # per-epoch stream: a resumed run draws the same order and flips
        order, flips = rng.permutation(len(ds)), rng.random(len(ds)) < 0.5
        head.train()
        t0, total, steps = time.perf_counter(), 0.0, 0
        bar = progress(total=len(ds), desc=f"affinity epoch {epoch + 1}/{cfg.epochs}", unit="img")
        for j, i in enumerate(order):
            image, mask = ds.read_image(int(i)), read_mask(mask_dir / f"{ds[int(i)].id}.png", num_classes=len(ds.classes))
            if flips[j]:
                image, mask = image[:, ::-1], mask[:, ::-1]
            labels = grid_labels(mask, len(ds.classes), cfg.min_share).to(device)
            loss = affinity_loss(embed(backbone, head, _input(image, mean, std, device)), labels, offsets)
            bar.update(1)
            if loss is None:
                continue
            for g in opt.param_groups:
                g["lr"] = poly_lr(cfg.lr, epoch * len(ds) + j, n_iter)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        bar.close()
        rows.append({"epoch": epoch + 1, "loss": round(total / max(steps, 1), 5), "seconds": round(time.perf_counter() - t0, 1)})
        log.info("affinity epoch %d/%d: loss %.4f (%d images with labelled pairs)", epoch + 1, cfg.epochs, rows[-1]["loss"], steps)
        save_checkpoint(ckpt_path, {"head": head.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "rows": rows})
    save_checkpoint(out_dir / "head.pt", {"head": head.state_dict(), "level_channels": list(backbone.level_channels),
                                          "width": cfg.width, "dim": cfg.dim})
    write_log_csv(out_dir / "log.csv", rows)
    return {"epochs": cfg.epochs, "seconds": round(sum(r["seconds"] for r in rows), 1), "final_loss": rows[-1]["loss"] if rows else None}


def load_affinity_head(path: Path, device: torch.device) -> AffinityHead:
    ck = load_checkpoint(path)
    head = AffinityHead(ck["level_channels"], ck["width"], ck["dim"])
    head.load_state_dict(ck["head"])
    return head.to(device).eval()


def walk_maps(backbone, head: AffinityHead, ds: Dataset, cam_dir: Path, out_dir: Path, cfg: AffinityConfig, mean, std,
              device: torch.device) -> int:
    """Write ``out_dir/<id>.npz``, the random-walked maps of ``cam_dir/<id>.npz``, for every image of
    ``ds`` without one; returns how many were computed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, s in enumerate(ds) if not (out_dir / f"{s.id}.npz").is_file()]
    backbone.eval().to(device)
    for i in progress(todo, desc="affinity: random walk", unit="img"):
        s = ds[i]
        classes, cams = load_cam(cam_dir / f"{s.id}.npz", ds.num_classes)
        image = ds.read_image(i)
        if cams.shape[1:] != image.shape[:2]:
            raise DataError(f"maps are {cams.shape[1]}x{cams.shape[2]} but the image is {image.shape[0]}x{image.shape[1]}",
                            cam_dir / f"{s.id}.npz")
        with torch.no_grad():
            emb = embed(backbone, head, _input(image, mean, std, device)).cpu()
        save_cam(out_dir / f"{s.id}.npz", classes, refine_maps(cams, emb, cfg.radius, cfg.beta, cfg.steps))
    return len(todo)


def run_affinity_stage(cfg: "Config", run_dir: str | Path, force: bool = False) -> StageOutcome:
    """Pipeline entry: train the head, walk the maps of ``cam.split``, refine them into ``RUN/affinity/masks``."""
    from wsss.stages.crf import cam_source, crf_jobs, run_crf, write_stats
    from wsss.stages.data import open_split
    from wsss.stages.train_cls import load_classifier

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "affinity"
    source = cam_source(cfg, run_dir)
    mans = {name: read_manifest(run_dir / folder) for name, folder in (("classifier", "cls"), ("crf", "crf"), (source, source))}
    if any(m is None for m in mans.values()):
        raise WsssError("affinity needs the trained classifier, its maps and the crf pseudo-masks; run `wsss crf CONFIG` first", run_dir)
    a = cfg.affinity
    section = {"affinity": {k: v for k, v in config_to_dict(a).items() if k != "device"},
               "crf": {k: v for k, v in config_to_dict(cfg.crf).items() if k not in ("workers", "sweep", "sweep_images", "sweep_min_kept")},
               "seed": cfg.run.seed}
    chash = config_hash(section)
    inputs = {name: m["key"] for name, m in mans.items()}
    done = finished_outcome(out, "affinity", chash, inputs, force, required=("masks/stats.csv",))
    if done is not None:
        return done
    prepare_output_folder(out, stage_key("affinity", chash, inputs), force, "maps", "masks", "head.pt", "checkpoint.pt", "log.csv")
    save_config(a, out / "config.yaml")
    ds = open_split(run_dir, cfg.cam.split)
    device = resolve_device(a.device)
    model, meta = load_classifier(run_dir / "cls" / "classifier.pt", device)
    backbone = model.backbone
    if backbone.prefers_channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if not backbone.level_channels:
        raise WsssError(f"backbone '{meta.get('backbone', type(backbone).__name__)}' has no multi-level features for the affinity stage")
    t0 = time.perf_counter()
    if (out / "head.pt").is_file():
        train = {"epochs": a.epochs, "seconds": 0.0, "final_loss": None}
    else:
        train = train_affinity_head(backbone, ds, run_dir / "crf", a, meta["mean"], meta["std"], device, out, cfg.run.seed)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = load_affinity_head(out / "head.pt", device)
    walked = walk_maps(backbone, head, ds, run_dir / source, out / "maps", a, meta["mean"], meta["std"], device)
    t_walk = time.perf_counter() - t0
    t0 = time.perf_counter()
    crf_cfg = cfg.crf.model_copy(update={"mode": "confidence", "fg_threshold": a.fg_threshold, "low_threshold": a.low_threshold})
    (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs, _ = crf_jobs(ds, out / "maps", out / "masks")
    run_crf(jobs, crf_cfg, ds.num_classes, desc="affinity: crf")
    stats = write_stats(out / "masks", [s.id for s in ds])
    t_crf = time.perf_counter() - t0
    outputs = {"images": len(ds), "source": source, "walked": walked, "train_s": round(t_train, 1), "walk_s": round(t_walk, 1),
               "crf_s": round(t_crf, 1), "final_loss": train["final_loss"], **{k: round(v, 4) for k, v in stats.items()}}
    man = write_manifest(out, "affinity", section, chash, inputs, outputs, started)
    log.info("affinity: %d images from %s; head %.0f s, walk %.0f s, crf %.0f s; foreground %.1f%%, ignored %.1f%% -> %s",
             len(ds), source, t_train, t_walk, t_crf, 100 * stats["mean_fg_share"], 100 * stats["mean_ignore_share"], out / "masks")
    return StageOutcome(man, skipped=False)
