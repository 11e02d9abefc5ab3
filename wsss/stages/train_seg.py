"""Stage 5, `wsss train-seg`: a DeepLab segmenter trained on the pseudo-masks (255 ignored), or on the
ground-truth masks as the fully-supervised reference (``train_seg.masks=gt``).

Output folder (``RUN/seg/``, or ``RUN/seg_gt/`` for ground truth)::

    segmenter.pt    final weights + meta (arch, spec, classes, normalisation, resize_long)
    checkpoint.pt   model, optimiser, grad scaler, RNG state, epoch, iteration, config, history (resume)
    log.csv         one row per epoch: loss, lr, val mIoU (when the val split has masks), seconds
    config.yaml     the resolved train_seg section
    manifest.json   stage manifest

Augmentation: resize the long side to ``resize_long``, random scale, flip, optional colour jitter, crop
``crop_size`` (image padded with its mean, mask with 255). The augmentation of sample ``i`` in epoch
``e`` is drawn from an RNG seeded by ``(seed, e, i)``, the shuffle from ``(seed, e)``, and torch's RNG
(dropout) is saved in the checkpoint, so a run resumed at an epoch boundary ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import TrainSegConfig, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.data.transforms import to_tensor
from wsss.errors import DataError, WsssError, brief
from wsss.io import IGNORE, read_mask, remove_temp_files
from wsss.log import progress
from wsss.models.segmenter import Segmenter, create_segmenter
from wsss.stages.train_cls import train_transform
from wsss.training import (START_OVER, barrier, check_resumable, distributed_loss, freeze_parameters, is_main,
                           load_checkpoint, make_optimizer, memory_layout, poly_lr, rank_batches, rank_device, reduce_sum,
                           resolve_device, save_checkpoint, set_train_mode, write_log_csv)

if TYPE_CHECKING:
    from wsss.config import Config
    from wsss.manifest import StageOutcome

log = logging.getLogger(__name__)

MaskSource = Callable[[int], np.ndarray]


def pseudo_mask_stage(cfg: "Config") -> tuple[str, str]:
    """(stage, folder in the run directory) of the pseudo-masks train-seg reads by default: the affinity
    stage's when it is enabled, else the crf stage's."""
    return ("affinity", "affinity/masks") if cfg.affinity.enabled else ("crf", "crf")


def pseudo_mask_source(ds: Dataset, mask_dir: str | Path) -> MaskSource:
    """Masks ``<mask_dir>/<id>.png`` for the images of ``ds`` (all must exist; checked now)."""
    mask_dir = Path(mask_dir)
    missing = [s.id for s in ds if not (mask_dir / f"{s.id}.png").is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(ds)} training images have no pseudo-mask (first: {missing[0]}.png); "
                        f"run `wsss crf CONFIG` first", mask_dir)
    return lambda i: read_mask(mask_dir / f"{ds[i].id}.png", num_classes=len(ds.classes))


def gt_mask_source(ds: Dataset) -> MaskSource:
    """The ground-truth masks of ``ds`` (the fully-supervised reference only)."""
    if not ds.has_masks:
        raise DataError(f"split '{ds.split}' has no ground-truth masks (train_seg.masks=gt needs them)", ds.root)
    return lambda i: read_mask(ds[i].mask, num_classes=len(ds.classes))


class SegDataset(torch.utils.data.Dataset):
    """``(image (3, S, S) float, mask (S, S) int64)`` pairs; the mask source checks the ids (< K or 255)."""

    def __init__(self, ds: Dataset, masks: MaskSource, transform, mean, std, seed: int = 0) -> None:
        self.ds, self.masks, self.transform, self.mean, self.std, self.seed = ds, masks, transform, mean, std, seed
        self.epoch = 0
        self.num_classes = len(ds.classes)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image, mask = self.ds.read_image(i), self.masks(i)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match its image "
                            f"{image.shape[1]}x{image.shape[0]}", self.ds[i].image)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, mask = self.transform(image, mask, rng)
        return to_tensor(image, self.mean, self.std), torch.from_numpy(mask.astype(np.int64))


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits (B, K, H, W)`` against ``target (B, H, W)``, averaged over the pixels
    that are not 255; exactly 0 (with a gradient) when every pixel is ignored (torch's mean gives NaN)."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def build_segmenter(cfg: TrainSegConfig, num_classes: int, pretrained: bool | str | None = None) -> Segmenter:
    model = create_segmenter(cfg.arch, num_classes, pretrained=cfg.pretrained if pretrained is None else pretrained,
                             backbone=cfg.backbone, output_stride=cfg.output_stride, **cfg.head_options())
    if cfg.freeze_stem:
        freeze_parameters(model.stem_modules())
    return model


def autocast(device: torch.device, amp: str):
    """Mixed-precision context on CUDA (``bf16``/``fp16``); a no-op on CPU or for ``none``."""
    if amp == "none" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def load_segmenter(path: str | Path, device: torch.device | str = "cpu") -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild a segmenter saved as ``segmenter.pt`` (or a train-seg ``checkpoint.pt``): ``(model in eval
    mode, meta)``."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj or "arch" not in obj.get("meta", {}):
        raise WsssError("not a wsss segmenter file (needs 'model' and 'meta' with 'arch')", path)
    meta = obj["meta"]
    model = create_segmenter(meta["arch"], meta["num_classes"], pretrained=False, **meta["spec"])
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise WsssError(f"weights do not fit segmenter '{meta['arch']}' ({brief(e, 150)})", path) from None
    return model.to(device).eval(), meta


def evaluate_segmenter(model: Segmenter, ds: Dataset, resize_long: int | None, device: torch.device,
                       amp: str = "none", desc: str = "val") -> dict[str, Any]:
    """Single-scale mIoU (%) of ``model`` on ``ds`` (which has masks), at full mask resolution."""
    from wsss.metrics import confusion, iou_from_confusion
    from wsss.stages.predict import predict_probs

    k = len(ds.classes)
    cm = np.zeros((k, k), np.int64)
    for i in progress(range(len(ds)), desc=desc, unit="img", leave=False):
        probs = predict_probs(model, [ds.read_image(i)], scales=[1.0], flip=False, resize_long=resize_long,
                              device=device, amp=amp)[0]
        cm += confusion(ds.read_mask(i), probs.argmax(0).astype(np.uint8), k)
    iou = iou_from_confusion(cm)
    return {"mIoU": round(100 * float(np.nanmean(iou)), 2),
            "per_class_iou": {c: (None if v != v else round(100 * float(v), 2)) for c, v in zip(ds.classes, iou)}}


def train_segmenter(cfg: TrainSegConfig, train_ds: Dataset, masks: MaskSource, out_dir: str | Path,
                    val_ds: Dataset | None = None, seed: int = 0, resume: bool = True) -> dict[str, Any]:
    """Train on ``train_ds`` with ``masks(i) -> (H, W) uint8`` into ``out_dir`` (checkpoint every epoch).

    With ``resume`` an existing ``checkpoint.pt`` is continued from its last finished epoch (its config
    must match). Returns ``{"epochs", "iterations", "final", "history"}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    device = rank_device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    model = build_segmenter(cfg, len(train_ds.classes))
    nhwc = model.prefers_channels_last if cfg.channels_last is None else cfg.channels_last
    layout = memory_layout(nhwc)
    model = model.to(device, memory_format=layout)
    # frozen parameters are settled before the optimiser and DistributedDataParallel see the model
    set_train_mode(model, model.backbone, model.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)
    groups = model.param_groups(cfg.lr, cfg.head_lr_mult)
    opt = make_optimizer(groups, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and device.type == "cuda")
    fill = tuple(int(round(255 * m)) for m in model.mean)
    data = SegDataset(train_ds, masks, train_transform(cfg, fill), model.mean, model.std, seed)
    drop_last = len(data) > cfg.batch_size
    steps = len(data) // cfg.batch_size if drop_last else math.ceil(len(data) / cfg.batch_size)
    max_it = steps * cfg.epochs
    start_epoch, it, history = 0, 0, []
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, START_OVER)
        check_resumable(ck, config_to_dict(cfg), "train_seg", {"epochs", "device", "workers", "threads", "eval_every"}, ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck.get("scaler", {}) or scaler.state_dict())
        torch.set_rng_state(ck["rng"])
        start_epoch, it, history = ck["epoch"], ck["iteration"], list(ck["history"])
        log.info("train-seg: resumed from %s at epoch %d", ckpt_path, start_epoch)
    meta = {"arch": cfg.arch, "spec": model.spec(), "num_classes": len(train_ds.classes), "classes": list(train_ds.classes),
            "mean": list(model.mean), "std": list(model.std), "resize_long": cfg.resize_long, "masks": cfg.masks}
    has_val = val_ds is not None and len(val_ds) > 0 and val_ds.has_masks
    step = distributed_loss(model, lambda m, x, y: seg_loss(m(x), y), device, cfg.sync_bn)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        data.epoch = epoch
        batches = rank_batches(len(data), cfg.batch_size, seed * 100003 + epoch, drop_last)
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers)
        set_train_mode(model, model.backbone, model.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)
        total, n = 0.0, 0
        bar = progress(loader, desc=f"train-seg {epoch + 1}/{cfg.epochs}", unit="batch", disable=None if is_main() else True)
        for x, y in bar:
            for g in opt.param_groups:
                g["lr"] = poly_lr(g["base_lr"], it, max_it, cfg.warmup_iters)
            x = x.to(device, non_blocking=True, memory_format=layout)
            y = y.to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                loss = step(x, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            it += 1
            total += float(loss.detach()) * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.4f}")
        total, n = reduce_sum(total, n, device)
        if not math.isfinite(total):
            raise WsssError(f"train-seg: loss became {total} in epoch {epoch + 1}; lower train_seg.lr")
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(total / max(n, 1), 5), "lr": round(opt.param_groups[0]["lr"], 7)}
        if not is_main():  # rank 0 scores, checkpoints and logs; the others wait for it
            barrier()
            continue
        if has_val and cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            model.eval()
            row["val_mIoU"] = evaluate_segmenter(model, val_ds, cfg.resize_long, device, cfg.amp)["mIoU"]
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                    "rng": torch.get_rng_state(), "epoch": epoch + 1, "iteration": it,
                                    "config": config_to_dict(cfg), "history": history, "meta": meta})
        write_log_csv(out_dir / "log.csv", history)
        log.info("train-seg epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        barrier()
    if is_main():
        save_checkpoint(out_dir / "segmenter.pt", {"model": model.state_dict(), "meta": meta})
    barrier()
    return {"epochs": cfg.epochs, "iterations": it, "final": history[-1] if history else {}, "history": history}


def seg_folder(cfg: TrainSegConfig) -> str:
    """Run-directory folder of a segmenter: ``seg`` (pseudo-masks) or ``seg_gt`` (ground truth)."""
    return "seg" if cfg.masks == "pseudo" else "seg_gt"


def _folder_key(folder: Path) -> str:
    """A key for an explicit mask folder: names, sizes and modification times of its PNGs."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.png")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def run_train_seg_stage(cfg: "Config", run_dir: str | Path, force: bool = False, resume: bool = True) -> "StageOutcome":
    """Pipeline entry: train on ``data.train_split`` with the crf stage's pseudo-masks (or
    ``train_seg.mask_dir``, or the ground truth) into ``RUN/seg/`` (``RUN/seg_gt/``), unless up to date."""
    from wsss.config import config_hash
    from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
    from wsss.stages.data import open_split

    started = time.time()
    run_dir = Path(run_dir)
    c = cfg.train_seg
    out = run_dir / seg_folder(c)
    data_man = read_manifest(run_dir / "data")
    if data_man is None:
        raise WsssError("no finished data stage in this run directory; run `wsss run CONFIG --to data` first", run_dir)
    train = open_split(run_dir, cfg.data.train_split)
    if c.masks == "gt":
        inputs, masks = {"data": data_man["key"]}, gt_mask_source(train)
    elif c.mask_dir is not None:
        inputs, masks = {"data": data_man["key"], "masks": _folder_key(Path(c.mask_dir))}, pseudo_mask_source(train, c.mask_dir)
    else:
        stage, folder = pseudo_mask_stage(cfg)
        src_man = read_manifest(run_dir / stage)
        if src_man is None:
            raise WsssError(f"no finished {stage} stage in this run directory; run `wsss {stage} CONFIG` first "
                            "(or set train_seg.mask_dir, or train_seg.masks=gt)", run_dir)
        inputs, masks = {"data": data_man["key"], stage: src_man["key"]}, pseudo_mask_source(train, run_dir / folder)
    section = {k: v for k, v in config_to_dict(c).items() if k not in ("workers", "threads", "device")} | {"seed": cfg.run.seed}
    chash = config_hash(section)
    done = finished_outcome(out, "train-seg", chash, inputs, force, required=("segmenter.pt",))
    if done is not None:
        return done
    if is_main():
        prepare_output_folder(out, stage_key("train-seg", chash, inputs), force, "checkpoint.pt", "segmenter.pt", "log.csv")
    barrier()
    val = open_split(run_dir, cfg.data.val_split) if cfg.data.val_split else None
    summary = train_segmenter(c, train, masks, out, val, seed=cfg.run.seed, resume=resume)
    if not is_main():  # under torchrun rank 0 writes the manifest
        return StageOutcome({"stage": "train-seg", "outputs": {"final": {}}}, skipped=False)
    f = summary["final"]
    man = write_manifest(out, "train-seg", section, chash, inputs,
                         {"segmenter": "segmenter.pt", "log": "log.csv", "final": f}, started)
    log.info("train-seg: %s on %s masks, %d epochs, final loss %s%s -> %s", c.arch, c.masks, summary["epochs"], f.get("loss"),
             f", val mIoU {f['val_mIoU']:.1f}" if "val_mIoU" in f else "", out / "segmenter.pt")
    return StageOutcome(man, skipped=False)
