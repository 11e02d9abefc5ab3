"""Expansion rounds: fine-tune a trained classifier with the expansion methods (erasing rounds included),
extract new maps, merge them. Output folder layout (``out``)::

    <id>.npz        classes int16 (k,), cam float16 (k, H, W) in [0, 1]
    round_<r>/cls/  the fine-tuned classifier of round r (classifier.pt, checkpoint.pt, log.csv)
    round_<r>/cam/  its maps on the original images
    round_<r>/merged/  (erasing) the maps merged so far, input of the next round's erasing

Without ``erasing`` there is one round: a fine-tune with the selected methods, then extraction. With
``erasing`` (rounds >= 1), each round erases from the training images what the merged maps so far
highlight, fine-tunes the previous round's classifier on the erased images, extracts maps on the
original images and merges them (element-wise max) into the running maps -- for each image and class
only while the fine-tuned classifier still recognises that class in the erased image
(``expand.erasing.stop_score``), the guard against erasing the whole object and then learning
background. Every step resumes: training from its checkpoint, extraction and merging per file.

Under torchrun every rank takes part in the fine-tuning (DistributedDataParallel) and extracts its share
of the images (every N-th); rank 0 alone merges and copies.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from wsss.cam.extract import extract_to_folder
from wsss.camfile import load_cam, save_cam
from wsss.config import TrainClsConfig
from wsss.data.dataset import Dataset
from wsss.engine.classifier import predict_scores, train_classifier
from wsss.engine.core import barrier, broadcast_int, is_main, world
from wsss.errors import WsssError
from wsss.expand.methods import Combined, create_expand_methods
from wsss.log import progress
from wsss.models.checkpoint import load_classifier
from wsss.shard import shard_ids

if TYPE_CHECKING:
    from wsss.config import Config

log = logging.getLogger(__name__)


def erase_masks(cam_dir: Path, ds: Dataset, threshold: float) -> dict[str, np.ndarray]:
    """``{id: (H, W) bool}``: where any labelled class's map in ``cam_dir`` exceeds ``threshold``."""
    out = {}
    for s in ds:
        _, cam = load_cam(cam_dir / f"{s.id}.npz", ds.num_classes)
        if len(cam):
            out[s.id] = cam.max(0) > threshold
    return out


def merge_maps(base_dir: Path, new_dir: Path, out_dir: Path, ds: Dataset, allow: Mapping[str, np.ndarray] | None = None) -> int:
    """Write ``max(base, new)`` per image into ``out_dir`` (skipping files already there); with ``allow``
    (``{id: (k,) bool}``), a class's new map is merged only where allowed. Returns classes merged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = 0
    for s in ds:
        target = out_dir / f"{s.id}.npz"
        classes, base = load_cam(base_dir / f"{s.id}.npz", ds.num_classes)
        new_classes, new = load_cam(new_dir / f"{s.id}.npz", ds.num_classes)
        if not np.array_equal(classes, new_classes) or base.shape != new.shape:
            raise WsssError(f"maps of '{s.id}' differ in classes or size between {base_dir} and {new_dir}")
        ok = np.ones(len(classes), bool) if allow is None else allow[s.id]
        merged += int(ok.sum())
        if not target.is_file():
            out = base.copy()
            out[ok] = np.maximum(base[ok], new[ok])
            save_cam(target, classes, out)
    return merged


def finetune_config(cfg: "Config") -> TrainClsConfig:
    """The stage-1 recipe with the expand section's epochs and learning rate (weights come from stage 1)."""
    e = cfg.expand
    return cfg.train_cls.model_copy(update={"epochs": e.epochs, "lr": e.lr or cfg.train_cls.lr / 2, "pretrained": False})


def run_expand(cfg: "Config", train: Dataset, val: Dataset | None, classifier: Path, seed_cams: Path, out: Path,
               device: torch.device, extract: Dataset | None = None) -> dict:
    """Core of the stage (see the module docstring): fine-tunes on ``train``, writes ``out/<id>.npz`` for
    the images of ``extract`` (a part of ``train``; default all of it); returns timings/counts. Erasing's
    rounds before the last still extract all of ``train``: the next round erases every training image."""
    extract = train if extract is None else extract
    e = cfg.expand
    methods: Combined = create_expand_methods(e.methods, e)
    tcfg = finetune_config(cfg)
    head = {"head": methods.head, **methods.head_kwargs} if methods.head != "gap" else None
    rounds = max(methods.rounds, 1)
    rank, size = world()
    current, init = seed_cams, classifier
    report: dict = {"rounds": []}
    for r in range(1, rounds + 1):
        rdir = out / f"round_{r}"
        erase = erase_masks(current, train, e.erasing.threshold) if methods.rounds else None
        t0 = time.perf_counter()
        summary = train_classifier(tcfg, train, rdir / "cls", val, seed=cfg.run.seed + r, resume=True,
                                   init=init, head=head, hooks=methods, erase=erase)
        t_train = time.perf_counter() - t0
        model, meta = load_classifier(rdir / "cls" / "classifier.pt", device)
        t0 = time.perf_counter()
        images = extract if r == rounds else train
        mine = images if size == 1 else images.subset(shard_ids([s.id for s in images], (rank, size)))
        extract_to_folder(model, mine, cfg.cam, rdir / "cam", device, meta["mean"], meta["std"])
        barrier()
        t_cam = time.perf_counter() - t0
        row = {"round": r, "finetune_s": round(t_train, 1), "extract_s": round(t_cam, 1),
               "val_mAP": summary["final"].get("val_mAP")}
        if methods.rounds:
            n_ok = n_all = 0
            if is_main():
                scores = predict_scores(model, images, tcfg, device, erase)
                allow = {s.id: scores[i, [c - 1 for c in s.labels]] >= e.erasing.stop_score for i, s in enumerate(images)}
                n_ok = sum(int(a.sum()) for a in allow.values())
                n_all = sum(len(a) for a in allow.values())
                merge_maps(current, rdir / "cam", rdir / "merged", images, allow)
                log.info("expand round %d: classifier still recognises %d of %d erased image-classes (stop_score %.2f)",
                         r, n_ok, n_all, e.erasing.stop_score)
            n_ok = broadcast_int(n_ok, device)  # every rank must take the same decision to stop
            barrier()
            row["classes_merged"] = f"{n_ok}/{n_all}"
            current, init = rdir / "merged", rdir / "cls" / "classifier.pt"
            report["rounds"].append(row)
            if n_ok == 0:
                log.info("expand: nothing left to recognise after round %d; stopping", r)
                break
        else:
            current = rdir / "cam"
            report["rounds"].append(row)
    if e.merge_seed and current != seed_cams and not methods.rounds:
        if is_main():
            merge_maps(seed_cams, current, out / "with_seed", extract)
        current = out / "with_seed"
    if is_main():
        for s in progress(extract.samples, desc="expand: final maps", unit="img"):
            target = out / f"{s.id}.npz"
            if not target.is_file():
                shutil.copyfile(current / f"{s.id}.npz", target)
    barrier()
    report["finetune_s"] = round(sum(r["finetune_s"] for r in report["rounds"]), 1)
    report["extract_s"] = round(sum(r["extract_s"] for r in report["rounds"]), 1)
    return report

