"""Stage 0, data: materialise (synthetic) or locate a dataset, validate it, and record an index.

Output folder ``RUN/data/``: ``index.json`` (dataset root, source, classes, per split the image count),
``check.json`` (the `wsss data check` report of every split), ``splits/<split>.txt`` (the image ids of each
split, when ``data.val_fraction`` carved val out of train), ``synth/`` (the generated dataset, when
data.source is 'synth' and data.root is unset). Its key changes when labels, splits or image files change.
When the val split holds the training images, the log and the report say so.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsss.config import Config, config_to_dict
from wsss.data.check import check_dataset
from wsss.data.dataset import Dataset, carve_split, dataset_fingerprint, load_dataset
from wsss.data.synth import generate
from wsss.errors import DataError
from wsss.io import write_json, write_text
from wsss.pipeline.runner import SPLITS, StageContext, dataset_root

log = logging.getLogger(__name__)


def _datasets(ctx: StageContext) -> tuple[Path, list[Dataset], bool]:
    """``(root, [train, val], carved)``: the splits to train and validate on; ``carved`` when
    ``data.val_fraction`` carved val out of train (the dataset has no val split of its own)."""
    cfg = ctx.cfg.data
    root = dataset_root(cfg, ctx.run_dir)
    train = load_dataset(root, cfg.train_split, cfg.classes)
    if not cfg.val_split or cfg.val_split == cfg.train_split:
        return root, [train], False
    try:
        val = load_dataset(root, cfg.val_split, cfg.classes)
    except DataError:
        if not cfg.val_fraction:
            raise
        val = None
    if cfg.val_fraction and (val is None or [s.id for s in val] == [s.id for s in train]):
        return root, list(carve_split(train, cfg.val_fraction, cfg.val_split)), True
    return root, [train, val], False


def inputs(ctx: StageContext) -> dict[str, str]:
    if ctx.cfg.data.source == "synth":
        generate(ctx.cfg.data.synth, dataset_root(ctx.cfg.data, ctx.run_dir), force=ctx.force)
    ctx.found["datasets"] = _datasets(ctx)  # run() checks these: the dataset is read once
    return {"dataset": dataset_fingerprint(ctx.found["datasets"][1])}


def section(cfg: Config) -> dict:
    # the generator's settings make no data unless the source is synthetic: leaving them out of a real
    # dataset's key keeps a change of their defaults from re-running every stage of such runs
    d = config_to_dict(cfg.data)
    return d if cfg.data.source == "synth" else {k: v for k, v in d.items() if k != "synth"}


def run(ctx: StageContext) -> dict:
    root, datasets, carved = ctx.found["datasets"]
    reports = {}
    for ds in datasets:
        rep = check_dataset(ds)
        reports[ds.split] = rep.to_dict()
        if not rep.ok:
            first = rep.problems[0]
            more = f" (and {len(rep.problems) - 1} more problems; see `wsss data check {root}`)" if len(rep.problems) > 1 else ""
            raise DataError(f"{first.message}{more}", first.path)
    write_json(ctx.out / "check.json", reports)
    if carved:
        for ds in datasets:
            write_text(ctx.out / SPLITS / f"{ds.split}.txt", "".join(f"{s.id}\n" for s in ds))
    warnings = []
    ids = [{s.id for s in ds} for ds in datasets]
    if len(ids) == 1 or ids[0] == ids[1]:
        warnings.append(f"the val split is the training split ({len(datasets[0])} images): val mAP and val mIoU measure "
                        "images the networks trained on; add a split column to the CSV, a val split file, or set data.val_fraction")
    for w in warnings:
        log.warning("data: %s", w)
    index = {"root": str(root), "source": ctx.cfg.data.source, "classes": datasets[0].classes,
             "splits": {ds.split: len(ds) for ds in datasets}, "has_masks": {ds.split: ds.has_masks for ds in datasets},
             "carved": carved}
    write_json(ctx.out / "index.json", index)
    log.info("data: %s", ", ".join(f"{k} {v} images" for k, v in index["splits"].items()) + f", {len(index['classes']) - 1} classes, from {root}"
             + (f" (val carved out of train: data.val_fraction={ctx.cfg.data.val_fraction})" if carved else ""))
    return {"index": "index.json", "check": "check.json", **index["splits"], "warnings": warnings}
