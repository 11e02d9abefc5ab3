"""The stage bookkeeping, written once: upstream manifests -> key -> up to date? -> prepare the folder ->
run the adapter -> write the manifest; one stage as a command (torchrun, shards); a flow of stages.

An adapter (``wsss.stages.<name>``) provides ``inputs(ctx) -> {name: key}`` (raising when an upstream
stage has not finished), ``section(cfg) -> dict`` (the settings its key covers), ``run(ctx) -> outputs``
(writes into ``ctx.out``) and ``summary(cfg, run_dir, outcome) -> str`` (the command's one line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from wsss.config import Config, DataConfig, config_hash, save_config
from wsss.data.dataset import Dataset, load_dataset
from wsss.engine.core import barrier, init_distributed, is_main
from wsss.errors import ConfigError, DataError, WsssError
from wsss.io import read_json, remove_temp_files
from wsss.manifest import StageOutcome, finished_outcome, prepare_output_folder, read_manifest, stage_key, write_manifest
from wsss.pipeline.checks import check_config
from wsss.pipeline.table import STAGE_NAMES, folder_of, get_stage, stage_folder
from wsss.shard import Shard, check_shards, env_shard, shard_ids, write_shard_record

log = logging.getLogger(__name__)


def dataset_root(cfg: DataConfig, run_dir: Path) -> Path:
    """Where the dataset lives: ``data.root``, or ``RUN/data/synth`` for an unset synthetic root."""
    if cfg.root is not None:
        return Path(cfg.root)
    return Path(run_dir) / stage_folder("data") / "synth"


#: subfolder of the data stage's folder with the image ids of carved splits (``<split>.txt``)
SPLITS = "splits"


def open_split(run_dir: str | Path, split: str) -> Dataset:
    """Load a split of the dataset recorded in ``RUN/data/index.json`` (the data stage's output); a split
    the data stage carved (``data.val_fraction``) keeps only the ids listed in ``RUN/data/splits/``."""
    data = Path(run_dir) / stage_folder("data")
    index_path = data / "index.json"
    if not index_path.is_file():
        raise DataError("no data stage output here; run `wsss run CONFIG --to data` first", index_path)
    index = read_json(index_path)
    listed = data / SPLITS / f"{split}.txt"
    if index.get("carved") and listed.is_file():
        ids = listed.read_text(encoding="utf-8").splitlines()
        full = load_dataset(index["root"], next(iter(index["splits"])), index["classes"][1:])
        part = full.subset(ids)
        part.split = split
        return part
    return load_dataset(index["root"], split, index["classes"][1:])


@dataclass
class StageContext:
    """What an adapter gets: the config, the run directory, its output folder and key, the options."""

    cfg: Config
    run_dir: Path
    out: Path
    force: bool = False
    shard: Shard | None = None
    options: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    shards: int = 0  # finished shards merged (see select)
    selected: list[str] = field(default_factory=list)
    found: dict[str, Any] = field(default_factory=dict)  # what an adapter's inputs() loaded, for its run()

    def folder(self, name: str) -> Path:
        return folder_of(self.cfg, self.run_dir, name)

    def split(self, name: str) -> Dataset:
        return open_split(self.run_dir, name)

    def manifest_key(self, name: str, hint: str) -> str:
        """The key of finished stage ``name`` (from its folder's manifest); ``hint`` is the error when it
        has not finished."""
        man = read_manifest(self.folder(name))
        if man is None:
            raise WsssError(hint, self.run_dir)
        return man["key"]

    def select(self, ds: Dataset) -> Dataset:
        """The images this call computes: with a shard, its share (recorded for the merge); else all of
        ``ds``, after checking the shards finished so far (see :mod:`wsss.shard`)."""
        ids = [s.id for s in ds]
        if self.shard is not None:
            self.selected = shard_ids(ids, self.shard)
            return ds.subset(self.selected)
        self.shards = check_shards(self.out, self.key, ids)
        return ds


def run_stage(name: str, cfg: Config, run_dir: str | Path, force: bool = False, shard: Shard | None = None,
              **options: Any) -> StageOutcome:
    """Run stage ``name`` into its folder of ``run_dir`` unless a finished run with the same key is there."""
    stage = get_stage(name)
    adapter = stage.adapter()
    started = time.time()
    run_dir = Path(run_dir)
    ctx = StageContext(cfg, run_dir, folder_of(cfg, run_dir, name), force, shard, options)
    inputs = adapter.inputs(ctx)
    section = adapter.section(cfg)
    chash = config_hash(section)
    ctx.key = stage_key(name, chash, inputs)
    done = finished_outcome(ctx.out, name, chash, inputs, force, required=stage.required)
    if done is not None:
        return done
    if is_main():
        prepare_output_folder(ctx.out, ctx.key, force, stage.keep)
        save_config(getattr(cfg, stage.section), ctx.out / "config.yaml")
    if stage.distributed:  # every rank trains: the others wait for rank 0's folder
        barrier()
    outputs = adapter.run(ctx)
    if shard is not None:
        write_shard_record(ctx.out, name, ctx.key, shard, ctx.selected)
        log.info("%s: shard %d/%d: %d images (%d computed) -> %s", name, *shard, outputs["images"], outputs["computed"], ctx.out)
        return StageOutcome({"stage": name, "shard": list(shard), "outputs": outputs}, skipped=False)
    if not is_main():  # under torchrun rank 0 writes the manifest
        return StageOutcome({"stage": name, "outputs": outputs}, skipped=False)
    return StageOutcome(write_manifest(ctx.out, name, section, chash, inputs, outputs, started), skipped=False)


_HELD: dict[Path, tuple[Any, int]] = {}  # run directories this process holds: (open lock file, depth)


@contextlib.contextmanager
def hold_run(run_dir: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold the run directory's lock (``RUN/.lock``) while the block runs, so that a second `wsss run` or
    stage on the same directory is refused with one line naming the holder's pid instead of training on
    files the first is still writing. The OS drops the lock when its process ends, killed or not, so a
    dead holder never blocks. Re-entrant within a process. ``shared``: take no lock (shards and torchrun
    ranks other than 0 work in the directory together by design)."""
    import fcntl

    run_dir = Path(run_dir).resolve()
    if shared or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if run_dir in _HELD:
        f, depth = _HELD[run_dir]
        _HELD[run_dir] = (f, depth + 1)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise WsssError(f"run directory is in use by another wsss process (pid {pid}); wait for it to finish, "
                            "or give this run another run.out_dir", run_dir) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _HELD[run_dir] = (f, 1)
    try:
        yield
    finally:
        f, depth = _HELD[run_dir]
        if depth > 1:
            _HELD[run_dir] = (f, depth - 1)
        else:
            del _HELD[run_dir]
            f.close()  # closing the file releases the lock


def prepare_run(cfg: Config, config_name: str = "config.yaml") -> Path:
    """Check the config (every name, path and cross-section constraint: nothing is created when it
    fails), create the run directory, remove what a killed config or report write left at its top level
    and save the resolved config there."""
    check_config(cfg)
    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(run_dir, recursive=False)  # stages clean their own folders
    save_config(cfg, run_dir / config_name)
    return run_dir


def setup_run(cfg: Config) -> Path:
    """The run directory of a single-stage command, with its config saved and the data stage up to date."""
    run_dir = prepare_run(cfg)
    run_stage("data", cfg, run_dir)
    return run_dir


def run_command(name: str, cfg: Config, force: bool = False, shard: Shard | None = None, **options: Any) -> StageOutcome | None:
    """Stage ``name`` as its own command: the data stage is brought up to date first. A training stage
    joins torchrun's process group (rank 0 prepares the run directory first) and returns None on the
    other ranks; a per-image stage runs the ``shard`` given, or under torchrun this rank's shard followed
    by rank 0's merge."""
    stage = get_stage(name)
    check_config(cfg)
    shared = shard is not None or (stage.shardable and env_shard() is not None)
    with hold_run(cfg.run.out_dir, shared=shared):
        return _run_command(stage, cfg, force, shard, **options)


def _run_command(stage, cfg: Config, force: bool, shard: Shard | None, **options: Any) -> StageOutcome | None:
    name = stage.name
    setup = partial(setup_run, cfg)
    if stage.distributed:
        section = getattr(cfg, stage.section)
        started = init_distributed(getattr(section, "device", cfg.train_cls.device))
        main_rank = is_main()
        try:
            if main_rank:
                run_dir = setup()
            barrier()
            if not main_rank:
                run_dir = setup()
            outcome = run_stage(name, cfg, run_dir, force=force, **options)
        finally:
            if started:
                import torch.distributed as dist

                dist.destroy_process_group()
        return outcome if main_rank else None
    run_dir = setup()
    if shard is not None:
        if force:
            raise ConfigError("--force cannot be combined with --shard (it would clear the other shards' files)")
        return run_stage(name, cfg, run_dir, shard=shard, **options)
    shard = env_shard() if stage.shardable else None
    if shard is None:
        return run_stage(name, cfg, run_dir, force=force, **options)
    import torch.distributed as dist

    outcome = run_stage(name, cfg, run_dir, force=force, shard=shard, **options)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        dist.barrier()
        if shard[0] == 0:
            outcome = run_stage(name, cfg, run_dir, force=force, **options)
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()
    return outcome


@dataclass
class RunResult:
    run_dir: Path
    done: list[tuple[str, float, bool]] = field(default_factory=list)  # (stage, seconds, skipped)
    disabled: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    gallery: Path | None = None


def stage_slice(names: tuple[str, ...], from_stage: str | None, to_stage: str | None) -> list[str]:
    """The stages from ``from_stage`` to ``to_stage`` (inclusive) of ``names``."""
    for s in (from_stage, to_stage):
        if s is not None and s not in names:
            raise ConfigError(f"unknown stage '{s}' (stages: {', '.join(names)})")
    lo = names.index(from_stage) if from_stage else 0
    hi = names.index(to_stage) if to_stage else len(names) - 1
    if lo > hi:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}: nothing to run (order: {', '.join(names)})")
    return list(names[lo : hi + 1])


def run_flow(cfg: Config, names: tuple[str, ...] = STAGE_NAMES, from_stage: str | None = None, to_stage: str | None = None,
             force: tuple[str, ...] = (), config_name: str = "config.yaml") -> RunResult:
    """Run the stages ``names`` (in that order; a slice with ``from_stage``/``to_stage``) into
    ``cfg.run.out_dir``; a stage named in ``force`` is redone with everything after it."""
    todo = stage_slice(names, from_stage, to_stage)
    check_config(cfg)
    with hold_run(cfg.run.out_dir):
        return _run_flow(cfg, names, todo, force, config_name)


def _run_flow(cfg: Config, names: tuple[str, ...], todo: list[str], force: tuple[str, ...], config_name: str) -> RunResult:
    run_dir = prepare_run(cfg, config_name)
    forced_from = min((names.index(s) for s in force if s in names), default=len(names))
    result = RunResult(run_dir)
    for name in todo:
        if not get_stage(name).is_enabled(cfg):
            section = get_stage(name).section
            log.info("stage %s: disabled (%s.enabled=false)", name, section)
            result.disabled.append(name)
            continue
        t0 = time.time()
        outcome = run_stage(name, cfg, run_dir, force=names.index(name) >= forced_from)
        result.done.append((name, time.time() - t0, outcome.skipped))
    return result
