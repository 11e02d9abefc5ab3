"""Stage 3, `wsss expand`: fine-tune the stage-1 classifier with expansion methods, extract new maps.

Output folder ``RUN/expand/`` (same file format as ``RUN/cam/``, so `wsss eval cam` and `wsss crf`
take either)::

    <id>.npz        classes int16 (k,), cam float16 (k, H, W) in [0, 1]
    round_<r>/cls/  the fine-tuned classifier of round r (classifier.pt, checkpoint.pt, log.csv)
    round_<r>/cam/  its maps on the original images
    round_<r>/merged/  (erasing) the maps merged so far, input of the next round's erasing
    manifest.json   with the fine-tuning and extraction seconds of each round

Without ``erasing`` there is one round: a fine-tune with the selected methods, then extraction. With
``erasing`` (rounds >= 1), each round erases from the training images what the merged maps so far
highlight, fine-tunes the previous round's classifier on the erased images, extracts maps on the
original images and merges them (element-wise max) into the running maps -- for each image and class
only while the fine-tuned classifier still recognises that class in the erased image
(``expand.erasing.stop_score``), the guard against erasing the whole object and then learning
background. Every step resumes: training from its checkpoint, extraction and merging per file.

Under torchrun every rank takes part in the fine-tuning (DistributedDataParallel, as in `train-cls`)
and extracts its share of the images (every N-th); rank 0 alone merges, copies and writes the manifest.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from wsss.camfile import load_cam, save_cam
from wsss.config import TrainClsConfig, config_hash, config_to_dict, save_config
from wsss.data.dataset import Dataset
from wsss.errors import WsssError
from wsss.expand.methods import Combined, create_expand_methods
from wsss.log import progress
from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.shard import shard_ids
from wsss.stages.cam import run_cam_extraction
from wsss.stages.train_cls import load_classifier, predict_scores, resolve_device, train_classifier
from wsss.training import barrier, broadcast_int, is_main, rank_device, world

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
    head = {"head": methods.head, "acol_threshold": e.acol.threshold} if methods.head == "acol" else None
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
        run_cam_extraction(model, mine, cfg.cam, rdir / "cam", device, meta["mean"], meta["std"])
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


def run_expand_stage(cfg: "Config", run_dir: str | Path, force: bool = False) -> StageOutcome:
    """Pipeline entry: expanded maps of ``cam.split`` into ``RUN/expand/``."""
    from wsss.stages.data import open_split

    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "expand"
    cls_man, cam_man = read_manifest(run_dir / "cls"), read_manifest(run_dir / "cam")
    if cls_man is None or cam_man is None:
        raise WsssError("expand needs the trained classifier and its CAMs; run `wsss train-cls` and `wsss cam` first", run_dir)
    section = {"expand": config_to_dict(cfg.expand), "finetune": config_to_dict(finetune_config(cfg)),
               "cam": config_to_dict(cfg.cam), "seed": cfg.run.seed}
    chash = config_hash(section)
    inputs = {"classifier": cls_man["key"], "cam": cam_man["key"]}
    done = finished_outcome(out, "expand", chash, inputs, force)
    if done is not None:
        return done
    if is_main():
        prepare_output_folder(out, stage_key("expand", chash, inputs), force, "*.npz", "round_*", "with_seed")
        save_config(cfg.expand, out / "config.yaml")
    barrier()
    train = open_split(run_dir, cfg.cam.split)
    val = open_split(run_dir, cfg.data.val_split) if cfg.data.val_split else None
    device = rank_device(resolve_device(cfg.cam.device))
    report = run_expand(cfg, train, val, run_dir / "cls" / "classifier.pt", run_dir / "cam", out, device)
    outputs = {"images": len(train), "methods": cfg.expand.methods, **report}
    if not is_main():
        return StageOutcome({"stage": "expand", "outputs": outputs}, skipped=False)
    man = write_manifest(out, "expand", section, chash, inputs, outputs, started)
    log.info("expand: %s, %d round(s), fine-tuning %.0f s, extraction %.0f s -> %s", "+".join(cfg.expand.methods) or "plain fine-tune",
             len(report["rounds"]), report["finetune_s"], report["extract_s"], out)
    return StageOutcome(man, skipped=False)
