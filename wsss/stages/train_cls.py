"""Stage 1, `wsss train-cls`: a multi-label classifier trained from image-level labels only.

Output folder (``RUN/cls/``)::

    classifier.pt   final weights + meta (backbone, output_stride, classes, normalisation)
    checkpoint.pt   model, optimiser, epoch, iteration, config, history (for --resume)
    log.csv         one row per epoch: loss, lr, val mAP / F1, seconds
    config.yaml     the resolved train_cls section
    manifest.json   stage manifest

Reproducibility: the augmentation of sample ``i`` in epoch ``e`` is drawn from an RNG seeded by
``(seed, e, i)`` and the shuffling from ``(seed, e)``, so a run resumed at an epoch boundary
continues exactly as if it had never stopped, whatever the number of loader workers.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.config import TrainClsConfig, TrainCommon, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.data.transforms import ColorJitter, Compose, HFlip, RandomCrop, RandomScale, Resize, to_tensor
from wsss.errors import WsssError, brief
from wsss.io import remove_temp_files
from wsss.log import progress
from wsss.training import (START_OVER, barrier, check_resumable, distributed_loss, freeze_parameters, is_main,
                           load_checkpoint, make_optimizer, memory_layout as _layout, poly_lr, rank_batches, rank_device, reduce_sum,
                           resolve_device, save_checkpoint as _save_checkpoint, set_train_mode,
                           write_log_csv as _write_log)
from wsss.metrics import average_precision, f1_scores
from wsss.models.backbones import create_backbone
from wsss.models.classifier import Classifier, create_classifier

if TYPE_CHECKING:
    from wsss.config import Config
    from wsss.manifest import StageOutcome

log = logging.getLogger(__name__)


class ClsDataset(torch.utils.data.Dataset):
    """Image-level-label dataset for training: ``(image (3, S, S), labels (K,))``.

    ``erase`` maps image ids to boolean masks ``(H, W)`` at image resolution; those pixels are set to
    the normalisation mean (zero after normalising) after the augmentation, which moves the masks
    along with the image (nearest-neighbour, 255 padding = not erased).
    """

    def __init__(self, ds: Dataset, transform, mean, std, seed: int = 0,
                 erase: Mapping[str, np.ndarray] | None = None) -> None:
        self.ds, self.transform, self.mean, self.std, self.seed = ds, transform, mean, std, seed
        self.labels = ds.label_matrix()
        self.erase = erase or {}
        self.fill = np.round(np.asarray(mean) * 255).astype(np.uint8)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        erase = self.erase.get(self.ds[i].id)
        img, mask = self.transform(self.ds.read_image(i), None if erase is None else erase.astype(np.uint8), rng)
        if mask is not None:
            img = img.copy()
            img[mask == 1] = self.fill
        return to_tensor(img, self.mean, self.std), torch.from_numpy(self.labels[i])


class TrainHooks:
    """Extension points of :func:`train_classifier` used by the expansion methods (hide-and-seek, mixup):
    ``batch`` may change a batch ``x (B, 3, S, S)``, ``y (B, K)`` before the forward pass, ``regulariser``
    adds a loss term from that batch and its features ``(B, C, h, w)``. The base class changes nothing."""

    def batch(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def regulariser(self, model: Classifier, x: torch.Tensor, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return None


def classification_loss(model: Classifier, x: torch.Tensor, y: torch.Tensor, hooks: TrainHooks | None = None) -> torch.Tensor:
    """Multi-label soft-margin loss (both heads for ACoL) plus the hooks' regularisers."""
    feats = model.forward_features(x)
    loss = sum(F.multilabel_soft_margin_loss(logits, y) for logits in model.training_logits(feats, y))
    if hooks is not None:
        extra = hooks.regulariser(model, x, feats, y)
        if extra is not None:
            loss = loss + extra
    return loss


def train_transform(cfg: "TrainCommon", fill: tuple[int, int, int] | None = None) -> Compose:
    """The training augmentation of both training stages: resize the long side, random scale, flip,
    colour jitter, random crop (image padded with ``fill``, default the ImageNet mean; mask with 255)."""
    ts = []
    if cfg.resize_long:
        ts.append(Resize(long_side=cfg.resize_long))
    lo, hi = cfg.scale_range
    if (lo, hi) != (1.0, 1.0):
        ts.append(RandomScale(lo, hi))
    if cfg.hflip:
        ts.append(HFlip(0.5))
    if cfg.color_jitter:
        ts.append(ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    ts.append(RandomCrop(cfg.crop_size) if fill is None else RandomCrop(cfg.crop_size, fill))
    return Compose(ts)


def eval_transform(cfg: TrainClsConfig) -> Compose:
    return Compose([Resize(size=(cfg.crop_size, cfg.crop_size))])


def build_classifier(cfg: TrainClsConfig, num_classes: int, head: Mapping[str, Any] | None = None) -> Classifier:
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, output_stride=cfg.output_stride)
    model = create_classifier(backbone, num_classes, dropout=cfg.dropout, **(head or {}))
    if cfg.freeze_stem:
        freeze_parameters(backbone.stem_modules())
    return model


def use_channels_last(setting: bool | None, model: Classifier) -> bool:
    """The configured layout, or the backbone's preference when unset."""
    return model.backbone.prefers_channels_last if setting is None else setting


@torch.no_grad()
def predict_scores(model: Classifier, ds: Dataset, cfg: TrainClsConfig, device: torch.device,
                   erase: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Sigmoid scores ``(N, K)`` of ``ds`` at the training resolution (with ``erase`` applied, as in
    :class:`ClsDataset`)."""
    model.eval()
    data = ClsDataset(ds, eval_transform(cfg), model.backbone.mean, model.backbone.std, erase=erase)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, num_workers=cfg.workers)
    layout = _layout(use_channels_last(cfg.channels_last, model))
    out = [torch.sigmoid(model(x.to(device, memory_format=layout))).float().cpu() for x, _ in loader]
    return torch.cat(out).numpy()


def evaluate_classifier(model: Classifier, ds: Dataset, cfg: TrainClsConfig, device: torch.device) -> dict[str, float]:
    """mAP and F1 (macro, micro; threshold 0.5) on ``ds``."""
    scores = predict_scores(model, ds, cfg, device)
    targets = ds.label_matrix()
    ap = average_precision(scores, targets)
    f1_macro, f1_micro = f1_scores(scores, targets)
    return {"mAP": float(np.nanmean(ap)), "f1_macro": f1_macro, "f1_micro": f1_micro}


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved as ``classifier.pt``; returns ``(model in eval mode, meta)``."""
    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or "model" not in obj or "meta" not in obj:
        raise WsssError("not a wsss classifier file (needs 'model' and 'meta')", path)
    meta = obj["meta"]
    backbone = create_backbone(meta["backbone"], pretrained=False, output_stride=meta["output_stride"])
    model = create_classifier(backbone, meta["num_classes"], **meta.get("head", {}))
    try:
        model.load_state_dict(obj["model"])
    except RuntimeError as e:
        raise WsssError(f"weights do not fit backbone '{meta['backbone']}' ({brief(e, 150)})", path) from None
    return model.to(device).eval(), meta


def train_classifier(cfg: TrainClsConfig, train_ds: Dataset, out_dir: str | Path, val_ds: Dataset | None = None,
                     seed: int = 0, resume: bool = False, *, init: str | Path | None = None,
                     head: Mapping[str, Any] | None = None, hooks: TrainHooks | None = None,
                     erase: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Train the classifier, checkpointing every epoch into ``out_dir``. Returns a summary dict.

    With ``resume=True`` an existing ``checkpoint.pt`` is continued from its last finished epoch.
    Fine-tuning (the expansion methods): ``init`` starts from a saved ``classifier.pt`` (a new head's
    weights stay freshly initialised), ``head`` picks the classifier head (see ``create_classifier``),
    ``hooks`` change batches and add loss terms, ``erase`` blanks regions of training images.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    device = rank_device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    model = build_classifier(cfg, train_ds.num_classes, head)
    if init is not None:
        start = load_checkpoint(init)
        missing, unexpected = model.load_state_dict(start.get("model", {}), strict=False)
        if unexpected or any(not k.startswith("classifier_b.") for k in missing):
            raise WsssError(f"cannot start from {init}: weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")
    nhwc = use_channels_last(cfg.channels_last, model)
    model = model.to(device, memory_format=_layout(nhwc))
    # frozen parameters are settled before the optimiser and DistributedDataParallel see the model
    set_train_mode(model, model.backbone, model.backbone.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)
    groups = model.param_groups(cfg.lr, cfg.head_lr_mult)
    opt = make_optimizer(groups, cfg)
    data = ClsDataset(train_ds, train_transform(cfg), model.backbone.mean, model.backbone.std, seed, erase)
    steps = math.ceil(len(data) / cfg.batch_size)
    drop_last = len(data) > cfg.batch_size
    if drop_last:
        steps = len(data) // cfg.batch_size
    max_it = steps * cfg.epochs
    start_epoch, it, history = 0, 0, []
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, START_OVER)
        check_resumable(ck, config_to_dict(cfg), "train_cls", {"epochs", "device", "workers", "threads"}, ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, it, history = ck["epoch"], ck["iteration"], list(ck["history"])
        log.info("train-cls: resumed from %s at epoch %d", ckpt_path, start_epoch)
    meta = {"backbone": cfg.backbone, "output_stride": model.backbone.output_stride, "num_classes": train_ds.num_classes,
            "classes": list(train_ds.classes), "mean": list(model.backbone.mean), "std": list(model.backbone.std),
            "head": model.head_config()}
    step = distributed_loss(model, lambda m, x, y: classification_loss(m, x, y, hooks), device, cfg.sync_bn)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        data.epoch = epoch
        batches = rank_batches(len(data), cfg.batch_size, seed * 100003 + epoch, drop_last)
        loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers)
        set_train_mode(model, model.backbone, model.backbone.stem_modules(), cfg.freeze_bn, cfg.freeze_stem)
        total, n = 0.0, 0
        bar = progress(loader, desc=f"train-cls {epoch + 1}/{cfg.epochs}", unit="batch", disable=None if is_main() else True)
        for x, y in bar:
            for g in opt.param_groups:
                g["lr"] = poly_lr(g["base_lr"], it, max_it, cfg.warmup_iters)
            x = x.to(device, non_blocking=True, memory_format=_layout(nhwc))
            y = y.to(device, non_blocking=True)
            if hooks is not None:
                x, y = hooks.batch(x, y, np.random.default_rng([seed, 7919, it]))
            loss = step(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            total += float(loss.detach()) * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.4f}")
        total, n = reduce_sum(total, n, device)
        if not math.isfinite(total):
            raise WsssError(f"train-cls: loss became {total} in epoch {epoch + 1}; lower train_cls.lr")
        row = {"epoch": epoch + 1, "loss": round(total / max(n, 1), 5), "lr": round(opt.param_groups[0]["lr"], 7)}
        if not is_main():  # rank 0 scores, checkpoints and logs; the others wait for it
            barrier()
            continue
        if val_ds is not None and len(val_ds):
            row.update({f"val_{k}": round(v, 4) for k, v in evaluate_classifier(model, val_ds, cfg, device).items()})
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                                     "iteration": it, "config": config_to_dict(cfg), "history": history, "meta": meta})
        _write_log(out_dir / "log.csv", history)
        log.info("train-cls epoch %d/%d: %s", epoch + 1, cfg.epochs, ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        barrier()
    if is_main():
        _save_checkpoint(out_dir / "classifier.pt", {"model": model.state_dict(), "meta": meta})
    barrier()
    final = history[-1] if history else {}
    return {"epochs": cfg.epochs, "iterations": it, "final": final, "history": history}


def run_train_cls_stage(cfg: "Config", run_dir: str | Path, force: bool = False, resume: bool = True) -> "StageOutcome":
    """Pipeline entry: train on the data stage's splits into ``RUN/cls/`` unless up to date.

    An interrupted training (``checkpoint.pt`` without a finished manifest) is resumed.
    """
    from wsss.config import config_hash
    from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
    from wsss.stages.data import open_split

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "cls"
    data_man = read_manifest(run_dir / "data")
    if data_man is None:
        raise WsssError("no finished data stage in this run directory; run `wsss run CONFIG --to data` first", run_dir)
    section = config_to_dict(cfg.train_cls) | {"seed": cfg.run.seed}
    chash = config_hash(section)
    inputs = {"data": data_man["key"]}
    done = finished_outcome(out, "train-cls", chash, inputs, force, required=("classifier.pt",))
    if done is not None:
        return done
    if is_main():
        prepare_output_folder(out, stage_key("train-cls", chash, inputs), force, "checkpoint.pt", "classifier.pt", "log.csv")
    barrier()
    train = open_split(run_dir, cfg.data.train_split)
    val = open_split(run_dir, cfg.data.val_split) if cfg.data.val_split else None
    summary = train_classifier(cfg.train_cls, train, out, val, seed=cfg.run.seed, resume=resume)
    if not is_main():  # under torchrun rank 0 writes the manifest
        return StageOutcome({"stage": "train-cls", "outputs": {"final": {}}}, skipped=False)
    man = write_manifest(out, "train-cls", section, chash, inputs,
                         {"classifier": "classifier.pt", "log": "log.csv", "final": summary["final"]}, started)
    f = summary["final"]
    log.info("train-cls: %d epochs, final loss %s%s -> %s", summary["epochs"], f.get("loss"),
             f", val mAP {f['val_mAP']:.3f}" if "val_mAP" in f else "", out / "classifier.pt")
    return StageOutcome(man, skipped=False)
