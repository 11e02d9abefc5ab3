"""`wsss data check`: decode every image and mask of a dataset and summarise it.

:func:`check_root` lists every problem of a dataset in one pass: the structural ones the loader
records (missing files, unknown classes, duplicate ids, malformed CSV rows; see
:mod:`wsss.data.dataset`) and the per-file ones that need every file decoded: unreadable images,
masks whose size differs from their image, mask ids outside the class range.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from wsss.data.dataset import Dataset, csv_has_split_column, load_dataset
from wsss.errors import DataError
from wsss.io import IGNORE, read_image, read_mask
from wsss.log import progress

log = logging.getLogger(__name__)


@dataclass
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class CheckReport:
    """Summary of one split: counts, sizes, mask coverage and the problems found."""

    split: str
    classes: list[str]
    images: int = 0
    skipped: list[str] = field(default_factory=list)
    label_counts: dict[str, int] = field(default_factory=dict)
    labels_per_image: dict[int, int] = field(default_factory=dict)
    masks: int = 0
    pixel_share: dict[str, float] = field(default_factory=dict)
    ignore_share: float = 0.0
    label_mask_disagree: int = 0
    min_size: tuple[int, int] = (0, 0)
    max_size: tuple[int, int] = (0, 0)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["problems"] = [str(p) for p in self.problems]
        d["ok"] = self.ok
        return d

    def summary_lines(self) -> list[str]:
        name = self.split or "all"
        lines = [f"split {name}: {self.images} images ({len(self.skipped)} skipped), {self.masks} with masks, "
                 f"sizes {self.min_size[0]}x{self.min_size[1]} .. {self.max_size[0]}x{self.max_size[1]} (HxW)"]
        width = max(len(c) for c in self.classes)
        lines.append(f"  {'class':<{width}}  images  pixel share")
        for c in self.classes:
            share = f"{100 * self.pixel_share[c]:10.1f}%" if c in self.pixel_share else "          -"
            n = "" if c == "background" else self.label_counts.get(c, 0)
            lines.append(f"  {c:<{width}}  {n!s:>6}  {share}")
        if self.masks:
            lines.append(f"  ignore (255) share: {100 * self.ignore_share:.1f}%; images whose mask classes differ from their labels: {self.label_mask_disagree}")
        multi = ", ".join(f"{k} label{'s' if k != 1 else ''}: {v}" for k, v in sorted(self.labels_per_image.items()))
        lines.append(f"  labels per image: {multi}")
        lines.extend(f"  problem: {p}" for p in self.problems)
        return lines


def check_dataset(ds: Dataset, decode: bool = True) -> CheckReport:
    """Decode every image (and mask) of ``ds`` and collect statistics and problems."""
    rep = CheckReport(split=ds.split, classes=list(ds.classes), images=len(ds), skipped=list(ds.skipped))
    counts = Counter(c for s in ds for c in s.labels)
    rep.label_counts = {ds.classes[c]: counts.get(c, 0) for c in range(1, len(ds.classes))}
    rep.labels_per_image = dict(sorted(Counter(len(s.labels) for s in ds).items()))
    pix = np.zeros(256, dtype=np.int64)
    hs, ws = [], []
    for s in progress(ds.samples, desc=f"check {ds.split}".strip(), unit="img"):
        try:
            img = read_image(s.image) if decode else None
        except DataError as e:
            rep.problems.append(Problem(e.path or str(s.image), str(e).split(": ", 1)[-1]))
            continue
        if img is not None:
            hs.append(img.shape[0])
            ws.append(img.shape[1])
        if s.mask is None:
            continue
        try:
            m = ds.mask_reader(s) if ds.mask_reader is not None else read_mask(s.mask)
        except DataError as e:
            rep.problems.append(Problem(e.path or str(s.mask), str(e).split(": ", 1)[-1]))
            continue
        rep.masks += 1
        if img is not None and m.shape != img.shape[:2]:
            rep.problems.append(Problem(str(s.mask), f"mask size {m.shape[1]}x{m.shape[0]} (WxH) differs from image size {img.shape[1]}x{img.shape[0]}"))
            continue
        ids = np.bincount(m.ravel(), minlength=256)
        bad = [i for i in np.flatnonzero(ids) if i != IGNORE and i >= len(ds.classes)]
        if bad:
            rep.problems.append(Problem(str(s.mask), f"mask has ids {bad} outside the class range 0..{len(ds.classes) - 1} (and 255)"))
            continue
        pix += ids
        present = {int(i) for i in np.flatnonzero(ids) if 0 < i < len(ds.classes)}
        if present != set(s.labels):
            rep.label_mask_disagree += 1
    if hs:
        rep.min_size, rep.max_size = (min(hs), min(ws)), (max(hs), max(ws))
    total = pix.sum()
    if total:
        rep.ignore_share = float(pix[IGNORE] / total)
        rep.pixel_share = {c: float(pix[i] / total) for i, c in enumerate(ds.classes)}
    return rep


def dataset_splits(root: str | Path) -> list[str]:
    """The splits of a dataset: a VOC folder's split files, a COCO folder's ``annotations/instances_<split>.json``;
    for a CSV manifest one entry, ``""`` (all rows)."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return [""]
    from wsss.data.coco import coco_splits, is_coco

    if is_coco(root):
        return coco_splits(root)
    split_dir = root / "ImageSets" / "Segmentation"
    splits = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
    if not splits:
        raise DataError("no split files in ImageSets/Segmentation/", root)
    return splits


def check_root(root: str | Path, splits: Sequence[str] | None = None, classes: Sequence[str] | None = None,
               decode: bool = True) -> list[CheckReport]:
    """One :class:`CheckReport` per split of the dataset at ``root`` (default: every split), each with all
    of its problems, structural and per-file."""
    root = Path(root)
    if not root.exists():
        raise DataError("dataset folder not found", root)
    reports = []
    for split in splits or dataset_splits(root):
        found: list[tuple[str, str]] = []
        if root.suffix.lower() != ".csv" or split or not csv_has_split_column(root):
            ds = load_dataset(root, split or "train", classes, found)
        else:
            ds = load_dataset(root, "", classes, found)
        rep = check_dataset(ds, decode)
        rep.problems = [Problem(path, message) for path, message in found] + rep.problems
        reports.append(rep)
    return reports
