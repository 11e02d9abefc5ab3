"""Stage manifests and the run-directory layout.

Each stage writes its outputs into its own folder of the run directory, plus ``manifest.json``::

    {"stage", "config_hash", "config", "inputs": {name: hash}, "outputs": {...},
     "key": hash of (stage, config hash, input hashes, wsss version), "versions", "wall_time_s", "finished"}

``key`` is what a later run compares to decide whether the stage can be skipped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from wsss import __version__
from wsss.io import read_json, write_json

_PACKAGES = ("torch", "torchvision", "numpy", "opencv-python-headless", "Pillow", "grad-cam", "pydensecrf2", "pydantic")


@dataclass(frozen=True)
class StageOutcome:
    """What a stage's run function returns: its manifest, and whether it was skipped as up to date."""

    manifest: dict[str, Any]
    skipped: bool


def package_versions() -> dict[str, str]:
    """Versions of Python, wsss and the main dependencies (missing ones omitted)."""
    out = {"python": platform.python_version(), "wsss": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_key(stage: str, config_hash: str, inputs: Mapping[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": config_hash, "inputs": dict(sorted(inputs.items())), "wsss": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_manifest(folder: str | Path, stage: str, config: Mapping[str, Any], config_hash: str,
                   inputs: Mapping[str, str], outputs: Mapping[str, Any], started: float) -> dict[str, Any]:
    """Write ``folder/manifest.json`` (atomically) and return it. ``started`` is a ``time.time()``."""
    man = {
        "stage": stage,
        "key": stage_key(stage, config_hash, inputs),
        "config_hash": config_hash,
        "config": dict(config),
        "inputs": dict(inputs),
        "outputs": dict(outputs),
        "versions": package_versions(),
        "wall_time_s": round(time.time() - started, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(Path(folder) / "manifest.json", man)
    return man


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a finished stage folder, or None when absent or unreadable."""
    p = Path(folder) / "manifest.json"
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except Exception:
        return None


def finished_outcome(folder: str | Path, stage: str, config_hash: str, inputs: Mapping[str, str],
                     force: bool = False, required: tuple[str, ...] = ()) -> StageOutcome | None:
    """A skipped :class:`StageOutcome` when ``folder`` holds a finished run of ``stage`` with the same key
    (and the ``required`` files), else None. Logs the skip."""
    import logging

    old = read_manifest(folder)
    if force or old is None or old.get("key") != stage_key(stage, config_hash, inputs):
        return None
    if not all((Path(folder) / f).is_file() for f in required):
        return None
    logging.getLogger("wsss.stages").info("%s: up to date (%s), skipped", stage, folder)
    return StageOutcome(old, skipped=True)


def prepare_output_folder(out: str | Path, key: str, clear: bool, keep: tuple[str, ...] = ()) -> None:
    """Make ``out`` hold only outputs of ``key`` (so a re-run resumes only its own work, and a killed
    training's checkpoint is never resumed on changed inputs): remove temp files left by a killed run;
    when ``clear`` is set or the ``.key`` marker (written before any output; without one, the manifest)
    names another key, empty the folder -- every file and subfolder, however deep (image ids may hold
    folders: ``photos/x``), except the names in ``keep``."""
    import shutil

    from wsss.io import remove_temp_files, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)
    marker = out / ".key"
    if marker.is_file():
        stale = marker.read_text().strip() != key
    else:  # a folder written before markers existed
        old = read_manifest(out)
        stale = old is not None and old.get("key") != key
    if clear or stale:
        for f in out.iterdir():
            if f.name not in keep:
                shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink()
    write_text(marker, key + "\n")


def keep_keyed_outputs(out: str | Path, marker_name: str, names: tuple[str, ...], key: str, force: bool) -> bool:
    """Within a stage folder, outputs that carry their own key (a trained model, maps made from it):
    remove ``out``'s ``names`` unless the marker file ``marker_name`` says they were made with ``key`` (and
    not ``force``); write the marker before anything new is made. True when they were kept."""
    import shutil

    from wsss.io import write_text

    out = Path(out)
    marker = out / marker_name
    kept = not force and marker.is_file() and marker.read_text().strip() == key
    if not kept:
        for name in names:
            f = out / name
            shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
        write_text(marker, key + "\n")
    return kept
