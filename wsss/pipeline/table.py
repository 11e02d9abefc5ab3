"""The table of stages: the one place that names a stage, its folder in the run directory, its config
section, the stages it reads and what it hands on. The CLI subcommands, ``--from/--to/--force``, the flows,
the report, the gallery and ``--device`` all derive from it.

Run-directory layout (the on-disk contract between stages; each folder holds ``manifest.json`` when
finished, ``config.yaml`` and a ``.key`` marker)::

    data/            index.json, check.json (synth/: the generated dataset)
    cls/             classifier.pt, checkpoint.pt, log.csv
    cam/             <id>.npz  (classes int16 (k,), cam float16 (k, H, W) in [0, 1])
    expand/          <id>.npz  (same format), round_<r>/
    crf/             <id>.png  (palette PNG, 255 = ignore), stats.csv
    segmaps/         segmenter/segmenter.pt, maps/<id>.npz, masks/<id>.png
    affinity/        head.pt, maps/<id>.npz, masks/<id>.png
    seg/ (seg_gt/)   segmenter.pt, checkpoint.pt, log.csv
    predict/<split>/ (predict_gt/<split>/)  <id>.png, overlay/<id>.jpg
    eval/            summary.json; each scored folder gets its own eval/
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from wsss.errors import ConfigError

if TYPE_CHECKING:
    from wsss.config import Config


@dataclass(frozen=True)
class Stage:
    """One row of the table. ``folder``/``folder_gt`` may hold ``{split}``; ``maps``/``masks`` name the
    subfolder holding the maps (``.npz``) or masks (``.png``) the stage hands on, when it hands any on.
    Everything under the folder is the stage's and is cleared when its key changes, except ``keep``;
    ``required`` files must exist for a finished stage to count as up to date."""

    name: str
    folder: str
    section: str
    upstream: tuple[str, ...]
    reads: str
    writes: str
    help: str
    folder_gt: str | None = None
    maps: str | None = None
    masks: str | None = None
    enabled: Callable[["Config"], bool] | None = None
    keep: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    shardable: bool = False
    distributed: bool = False

    def adapter(self) -> ModuleType:
        """The stage's adapter module, ``wsss.stages.<name>``."""
        return importlib.import_module(f"wsss.stages.{self.name.replace('-', '_')}")

    def is_enabled(self, cfg: "Config") -> bool:
        return self.enabled is None or self.enabled(cfg)


STAGES: tuple[Stage, ...] = (
    Stage("data", "data", "data", (), "data.root (VOC folder or CSV) or the synthetic generator",
          "index.json, check.json", "make or locate the dataset, check it, record its index", keep=("synth",)),
    Stage("train-cls", "cls", "train_cls", ("data",), "images and image-level labels",
          "classifier.pt", "train the multi-label classifier from image-level labels", required=("classifier.pt",), distributed=True),
    Stage("cam", "cam", "cam", ("train-cls",), "classifier.pt, images", "<id>.npz",
          "extract class activation maps (CAM, Grad-CAM family)", maps="", shardable=True),
    Stage("expand", "expand", "expand", ("train-cls", "cam"), "classifier.pt, cam/*.npz, images", "<id>.npz",
          "fine-tune with erasing / hide-and-seek / ACoL / mixup and extract expanded CAMs", maps="",
          enabled=lambda cfg: cfg.expand.enabled, distributed=True),
    Stage("crf", "crf", "crf", ("cam",), "cam/ or expand/ *.npz (crf.source), images", "<id>.png, stats.csv",
          "refine CAMs with a dense CRF into palette-PNG pseudo-masks", masks="",
          required=("stats.csv",), shardable=True),
    Stage("seg-maps", "segmaps", "segmaps", ("data", "crf"), "images + crf/*.png",
          "segmenter/segmenter.pt, maps/<id>.npz, masks/<id>.png", "train a segmenter on the crf pseudo-masks, take its label-restricted "
          "probabilities on the train photos as new maps, CRF them", maps="maps", masks="masks",
          enabled=lambda cfg: cfg.segmaps.enabled, required=("masks/stats.csv",),
          keep=("segmenter", "maps", ".seg_key", ".maps_key")),  # under their own key (wsss.stages.seg_maps)
    Stage("affinity", "affinity", "affinity", ("train-cls", "crf", "seg-maps", "cam"),
          "classifier.pt, the pseudo-masks and maps it refines (crf/*.png and the maps crf read, or segmaps/)",
          "maps/<id>.npz, masks/<id>.png", "learn pixel affinities from the pseudo-masks, random-walk the CAMs, CRF them again",
          maps="maps", masks="masks", enabled=lambda cfg: cfg.affinity.enabled, required=("masks/stats.csv",),
          keep=("head.pt", "checkpoint.pt", "log.csv", "maps", ".head_key", ".walk_key")),  # under their own key (wsss.stages.affinity)
    Stage("train-seg", "seg", "train_seg", ("data", "crf"), "images + pseudo-masks (crf/ or affinity/masks/; or ground truth)",
          "segmenter.pt", "train a DeepLab segmenter on the pseudo-masks (or the ground truth: --masks gt)",
          folder_gt="seg_gt", required=("segmenter.pt",), distributed=True),
    Stage("predict", "predict/{split}", "predict", ("train-seg",), "segmenter.pt, images of predict.split",
          "<id>.png, overlay/<id>.jpg", "segment a dataset split, images or folders with a trained segmenter",
          folder_gt="predict_gt/{split}", masks="", shardable=True),
    Stage("eval", "eval", "eval", ("cam", "expand", "crf", "seg-maps", "affinity", "predict"), "every finished map/mask folder + ground truth",
          "summary.json", "score maps, pseudo-masks and predictions against ground truth"),
)

#: the report subfolder `wsss eval` writes inside each folder it scores
EVAL_SUBFOLDER = "eval"

_BY_NAME = {s.name: s for s in STAGES}
#: stage names in pipeline order
STAGE_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def get_stage(name: str) -> Stage:
    """The table row of ``name``; an unknown name lists the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(STAGE_NAMES)})") from None


def stage_folder(name: str, gt: bool = False, split: str = "val") -> str:
    """Folder of stage ``name`` relative to the run directory: ``gt`` picks the ground-truth segmenter's
    (``seg_gt``, ``predict_gt/<split>``), ``split`` fills ``predict``'s."""
    s = get_stage(name)
    return (s.folder_gt if gt and s.folder_gt else s.folder).format(split=split)


def folder_of(cfg: "Config", run_dir: str | Path, name: str, split: str | None = None) -> Path:
    """``run_dir / stage_folder(name)`` for this config (its ``train_seg.masks`` and ``predict.split``)."""
    return Path(run_dir) / stage_folder(name, cfg.train_seg.masks == "gt", split or cfg.predict.split)


def maps_folder(cfg: "Config", run_dir: str | Path, name: str) -> Path:
    """The folder of the maps (``<id>.npz``) stage ``name`` hands on (``cam/``, ``affinity/maps/``)."""
    return _handed_on(cfg, run_dir, name, get_stage(name).maps, "maps")


def masks_folder(cfg: "Config", run_dir: str | Path, name: str) -> Path:
    """The folder of the masks (``<id>.png``) stage ``name`` hands on (``crf/``, ``affinity/masks/``)."""
    return _handed_on(cfg, run_dir, name, get_stage(name).masks, "masks")


def _handed_on(cfg: "Config", run_dir: str | Path, name: str, sub: str | None, kind: str) -> Path:
    if sub is None:
        raise ValueError(f"stage {name} hands on no {kind}")
    return folder_of(cfg, run_dir, name) / sub if sub else folder_of(cfg, run_dir, name)


def cam_source(cfg: "Config", run_dir: str | Path) -> str:
    """Which map stage the CRF reads: ``crf.source``, or for ``auto`` the expanded maps when the expand
    stage is enabled and finished, else the plain ones."""
    from wsss.manifest import read_manifest

    if cfg.crf.source != "auto":
        return cfg.crf.source
    return "expand" if cfg.expand.enabled and read_manifest(folder_of(cfg, run_dir, "expand")) is not None else "cam"


def refined_stage(cfg: "Config") -> str:
    """The stage whose pseudo-masks (and maps) the affinity stage learns from and walks: ``seg-maps`` when
    it is enabled, else ``crf`` (whose maps are those of :func:`cam_source`)."""
    return "seg-maps" if cfg.segmaps.enabled else "crf"


def mask_stages(cfg: "Config") -> tuple[str, ...]:
    """The enabled stages that write pseudo-masks of the train photos, in pipeline order."""
    return tuple(n for n in ("crf", "seg-maps", "affinity") if get_stage(n).is_enabled(cfg))


def pseudo_mask_stage(cfg: "Config") -> tuple[str, str]:
    """(stage, folder in the run directory) of the pseudo-masks train-seg reads by default: the last
    enabled of crf, seg-maps and affinity."""
    name = mask_stages(cfg)[-1]
    s = get_stage(name)
    return name, f"{s.folder}/{s.masks}" if s.masks else s.folder


def device_sections() -> tuple[str, ...]:
    """The config sections with a ``device`` setting (what ``--device`` sets)."""
    from wsss.config import Config

    out = []
    for s in STAGES:
        field = Config.model_fields[s.section].annotation
        if "device" in getattr(field, "model_fields", {}) and s.section not in out:
            out.append(s.section)
    return tuple(out)
