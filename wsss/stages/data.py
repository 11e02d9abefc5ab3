"""Stage 0, data: materialise (synthetic) or locate a dataset, validate it, and record an index.

Output folder ``RUN/data/``: ``index.json`` (dataset root, source, classes, per split the image count),
``check.json`` (the `wsss data check` report of every split), ``synth/`` (the generated dataset, when
data.source is 'synth' and data.root is unset). Its key changes when labels, splits or image files change.
"""

from __future__ import annotations

import logging

from wsss.config import Config, config_to_dict
from wsss.data.check import check_dataset
from wsss.data.dataset import dataset_fingerprint, load_dataset
from wsss.data.synth import generate
from wsss.errors import DataError
from wsss.io import write_json
from wsss.pipeline.runner import StageContext, dataset_root

log = logging.getLogger(__name__)


def _datasets(ctx: StageContext):
    cfg = ctx.cfg.data
    root = dataset_root(cfg, ctx.run_dir)
    splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split and cfg.val_split != cfg.train_split else [])
    return root, [load_dataset(root, s, cfg.classes) for s in splits]


def inputs(ctx: StageContext) -> dict[str, str]:
    if ctx.cfg.data.source == "synth":
        generate(ctx.cfg.data.synth, dataset_root(ctx.cfg.data, ctx.run_dir), force=ctx.force)
    return {"dataset": dataset_fingerprint(_datasets(ctx)[1])}


def section(cfg: Config) -> dict:
    return config_to_dict(cfg.data)


def run(ctx: StageContext) -> dict:
    root, datasets = _datasets(ctx)
    reports = {}
    for ds in datasets:
        rep = check_dataset(ds)
        reports[ds.split] = rep.to_dict()
        if not rep.ok:
            first = rep.problems[0]
            more = f" (and {len(rep.problems) - 1} more problems; see `wsss data check {root}`)" if len(rep.problems) > 1 else ""
            raise DataError(f"{first.message}{more}", first.path)
    write_json(ctx.out / "check.json", reports)
    index = {"root": str(root), "source": ctx.cfg.data.source, "classes": datasets[0].classes,
             "splits": {ds.split: len(ds) for ds in datasets}, "has_masks": {ds.split: ds.has_masks for ds in datasets}}
    write_json(ctx.out / "index.json", index)
    log.info("data: %s", ", ".join(f"{k} {v} images" for k, v in index["splits"].items()) + f", {len(index['classes']) - 1} classes, from {root}")
    return {"index": "index.json", "check": "check.json", **index["splits"]}
