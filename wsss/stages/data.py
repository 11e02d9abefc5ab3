"""Stage 0, data: materialise (synthetic) or locate a dataset, validate it, and record an index.

Output folder ``RUN/data/``::

    index.json     dataset root, source, classes, and per split the image count
    check.json     the `wsss data check` report of every split
    manifest.json  stage manifest; its key changes when labels, splits or image files change
    synth/         the generated dataset, when data.source is 'synth' and data.root is unset
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from wsss.config import DataConfig, config_hash, config_to_dict
from wsss.data.check import check_dataset
from wsss.data.dataset import Dataset, load_dataset
from wsss.data.synth import generate
from wsss.errors import DataError
from wsss.io import read_json, write_json
from wsss.manifest import StageOutcome, finished_outcome, read_manifest, write_manifest

log = logging.getLogger(__name__)


def dataset_fingerprint(datasets: list[Dataset]) -> str:
    """Hash of ids, labels and image file sizes of ``datasets`` (cheap; catches edits and swaps)."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(f"{ds.split}|{','.join(ds.classes)}\n".encode())
        for s in ds:
            st = s.image.stat()
            h.update(f"{s.id}|{s.labels}|{st.st_size}|{s.mask is not None}\n".encode())
    return h.hexdigest()[:16]


def dataset_root(cfg: DataConfig, run_dir: Path) -> Path:
    """Where the dataset lives: ``data.root``, or ``RUN/data/synth`` for an unset synthetic root."""
    if cfg.root is not None:
        return Path(cfg.root)
    return run_dir / "data" / "synth"


def open_split(run_dir: Path, split: str) -> Dataset:
    """Load a split of the dataset recorded in ``RUN/data/index.json`` (the data stage's output)."""
    index_path = Path(run_dir) / "data" / "index.json"
    if not index_path.is_file():
        raise DataError("no data stage output here; run `wsss run CONFIG --to data` first", index_path)
    index = read_json(index_path)
    return load_dataset(index["root"], split, index["classes"][1:])


def run_data_stage(cfg: DataConfig, run_dir: str | Path, force: bool = False) -> StageOutcome:
    """Prepare the dataset for a run and write ``RUN/data/``; returns the manifest and whether it ran.

    Skips all work when a previous manifest has the same key (same config and same files).
    """
    started = time.time()
    run_dir = Path(run_dir)
    out = run_dir / "data"
    root = dataset_root(cfg, run_dir)
    if cfg.source == "synth":
        generate(cfg.synth, root, force=force)
    splits = [cfg.train_split] + ([cfg.val_split] if cfg.val_split and cfg.val_split != cfg.train_split else [])
    datasets = [load_dataset(root, s, cfg.classes) for s in splits]
    section = config_to_dict(cfg)
    chash = config_hash(section)
    inputs = {"dataset": dataset_fingerprint(datasets)}
    done = finished_outcome(out, "data", chash, inputs, force)
    if done is not None:
        return done
    reports = {}
    for ds in datasets:
        rep = check_dataset(ds)
        reports[ds.split] = rep.to_dict()
        if not rep.ok:
            first = rep.problems[0]
            more = f" (and {len(rep.problems) - 1} more problems; see `wsss data check {root}`)" if len(rep.problems) > 1 else ""
            raise DataError(f"{first.message}{more}", first.path)
    write_json(out / "check.json", reports)
    index = {"root": str(root), "source": cfg.source, "classes": datasets[0].classes,
             "splits": {ds.split: len(ds) for ds in datasets}, "has_masks": {ds.split: ds.has_masks for ds in datasets}}
    write_json(out / "index.json", index)
    man = write_manifest(out, "data", section, chash, inputs, {"index": "index.json", "check": "check.json", **index["splits"]}, started)
    log.info("data: %s", ", ".join(f"{k} {v} images" for k, v in index["splits"].items()) + f", {len(index['classes']) - 1} classes, from {root}")
    return StageOutcome(man, skipped=False)
