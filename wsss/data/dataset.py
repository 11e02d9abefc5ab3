"""Datasets: images + image-level labels (+ optional ground-truth masks, for evaluation only).

Two on-disk sources load into the same :class:`Dataset`:

* a VOC-layout folder: ``JPEGImages/``, ``SegmentationClass[Aug]/``, ``ImageSets/Segmentation/<split>.txt``,
  ``classes.txt`` (line k = class id k, line 0 = background; the 20 VOC classes when absent), and
  image-level labels from ``labels.csv`` (``image,labels`` with space-separated class names) or, when
  that is absent, from VOC XML ``Annotations/``;
* a CSV manifest ``image,labels[,mask]`` with paths relative to the CSV (classes from ``classes.txt``
  beside it, or given explicitly).

Policy for problems (each reported as one line naming the file): structural problems are fatal
(:class:`DataError`); an image with no labels is skipped with a warning, because no weakly-supervised
stage can learn or extract anything from it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from wsss.config import VOC_CLASSES
from wsss.errors import DataError
from wsss.io import read_image, read_mask

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image: its id, file, image-level labels (class ids >= 1) and optional mask file."""

    id: str
    image: Path
    labels: tuple[int, ...]
    mask: Path | None = None


@dataclass
class Dataset:
    """An ordered list of samples with the class names (``classes[0] == 'background'``)."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    split: str = ""
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __iter__(self):
        return iter(self.samples)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (background excluded)."""
        return len(self.classes) - 1

    @property
    def has_masks(self) -> bool:
        return bool(self.samples) and all(s.mask is not None for s in self.samples)

    def label_vector(self, i: int) -> np.ndarray:
        """Multi-hot ``(num_classes,)`` float32 vector of sample ``i`` (background excluded)."""
        v = np.zeros(self.num_classes, dtype=np.float32)
        v[[c - 1 for c in self.samples[i].labels]] = 1.0
        return v

    def label_matrix(self) -> np.ndarray:
        """``(N, num_classes)`` multi-hot labels of all samples."""
        m = np.zeros((len(self), self.num_classes), dtype=np.float32)
        for i, s in enumerate(self.samples):
            m[i, [c - 1 for c in s.labels]] = 1.0
        return m

    def read_image(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of sample ``i``."""
        return read_image(self.samples[i].image)

    def read_mask(self, i: int) -> np.ndarray:
        """``(H, W)`` uint8 ground-truth ids of sample ``i`` (evaluation only)."""
        s = self.samples[i]
        if s.mask is None:
            raise DataError(f"image '{s.id}' has no ground-truth mask", self.root)
        return read_mask(s.mask)

    def subset(self, ids: Iterable[str]) -> "Dataset":
        keep = set(ids)
        return Dataset(self.root, self.classes, [s for s in self.samples if s.id in keep], self.split)


# --------------------------------------------------------------------------------------------------
# helpers


def _inside(root: Path, rel: str, what: str, where: Path) -> Path:
    """Resolve ``rel`` under ``root``; reject absolute paths and ``..`` escapes."""
    p = Path(rel)
    if p.is_absolute():
        raise DataError(f"{what} path '{rel}' must be relative to the dataset", where)
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise DataError(f"{what} path '{rel}' escapes the dataset folder", where)
    return root / p


def read_classes(path: Path) -> list[str]:
    """Read ``classes.txt``: one name a line, line 0 'background' (added when missing)."""
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not names:
        raise DataError("class list is empty", path)
    if names[0] != "background":
        names = ["background"] + names
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f"class '{n}' listed twice", path)
        seen.add(n)
    if len(names) > 255:
        raise DataError(f"{len(names)} classes: at most 254 foreground classes fit in a uint8 mask with 255 = ignore", path)
    return names


def _parse_labels(text: str, index: dict[str, int], where: str, path: Path) -> tuple[int, ...]:
    ids = []
    for name in text.replace(",", " ").replace(";", " ").split():
        if name == "background":
            continue
        if name not in index:
            known = ", ".join(list(index)[:25])
            raise DataError(f"{where}: unknown class '{name}' (known: {known})", path)
        ids.append(index[name])
    return tuple(sorted(set(ids)))


def read_labels_csv(path: Path, classes: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Read ``labels.csv`` (``image,labels``) into ``{id: class ids}``; duplicate ids are fatal."""
    index = {n: i for i, n in enumerate(classes)}
    out: dict[str, tuple[int, ...]] = {}
    for line, img, row in _image_rows(path, "image,labels"):
        img = Path(img).stem if Path(img).suffix.lower() in IMAGE_EXTS else img
        if img in out:
            raise DataError(f"line {line}: duplicate image id '{img}'", path)
        out[img] = _parse_labels(row.get("labels") or "", index, f"line {line}", path)
    return out


def _image_rows(path: Path, columns: str):
    """Yield ``(line number, image field, row)`` of a CSV whose header has ``image`` and ``labels``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(f"header must have columns '{columns}'", path)
        for row in reader:
            img = (row.get("image") or "").strip()
            if not img:
                raise DataError(f"line {reader.line_num}: empty image field", path)
            yield reader.line_num, img, row


def read_voc_xml(path: Path, classes: Sequence[str]) -> tuple[int, ...]:
    """Image-level labels from one VOC ``Annotations/<id>.xml`` (every ``object/name``)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"invalid XML ({e})", path) from None
    names = " ".join((o.findtext("name") or "").strip() for o in root.iter("object"))
    return _parse_labels(names, {n: i for i, n in enumerate(classes)}, "object", path)


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _finish(root: Path, classes: list[str], rows: list[tuple[str, Path, tuple[int, ...], Path | None]], split: str, where: Path) -> Dataset:
    samples, skipped, seen = [], [], set()
    for sid, img, labels, mask in rows:
        if sid in seen:
            raise DataError(f"duplicate image id '{sid}'", where)
        seen.add(sid)
        if not labels:
            log.warning("%s: image '%s' has no labels; skipped", where, sid)
            skipped.append(sid)
            continue
        samples.append(Sample(sid, img, labels, mask))
    if not samples:
        raise DataError(f"no usable images in split '{split}'", where)
    return Dataset(root, classes, samples, split, skipped)


# --------------------------------------------------------------------------------------------------
# sources


def load_voc(root: str | Path, split: str = "train", classes: Sequence[str] | None = None) -> Dataset:
    """Load split ``split`` of a VOC-layout folder (see module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)
    img_dir = root / "JPEGImages"
    if not img_dir.is_dir():
        raise DataError("not a VOC-layout dataset: JPEGImages/ is missing", root)
    if classes is not None:
        names = ["background"] + [c for c in classes if c != "background"]
    elif (root / "classes.txt").is_file():
        names = read_classes(root / "classes.txt")
    else:
        names = ["background", *VOC_CLASSES]

    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        avail = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt"))
        raise DataError(f"split file not found (available splits: {', '.join(avail) or 'none'})", split_file)
    ids = [ln.split()[0] for ln in split_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not ids:
        raise DataError("split file is empty", split_file)
    dup = _first_duplicate(ids)
    if dup is not None:
        raise DataError(f"duplicate image id '{dup}'", split_file)

    labels_csv = root / "labels.csv"
    ann_dir = root / "Annotations"
    labels: dict[str, tuple[int, ...]] | None = None
    if labels_csv.is_file():
        labels = read_labels_csv(labels_csv, names)
    elif not ann_dir.is_dir():
        raise DataError("no image-level labels: need labels.csv or Annotations/", root)

    mask_dir = next((d for d in (root / "SegmentationClassAug", root / "SegmentationClass") if d.is_dir()), None)
    rows = []
    for sid in ids:
        img = _find_image(img_dir, sid)
        if img is None:
            raise DataError(f"image '{sid}' listed in {split}.txt has no file in JPEGImages/", split_file)
        if labels is not None:
            if sid not in labels:
                raise DataError(f"no row for image '{sid}' (listed in {split}.txt)", labels_csv)
            lab = labels[sid]
        else:
            xml = ann_dir / f"{sid}.xml"
            if not xml.is_file():
                raise DataError(f"no annotation for image '{sid}'", xml)
            lab = read_voc_xml(xml, names)
        mask = None
        if mask_dir is not None and (mask_dir / f"{sid}.png").is_file():
            mask = mask_dir / f"{sid}.png"
        rows.append((sid, img, lab, mask))
    return _finish(root, names, rows, split, labels_csv if labels is not None else split_file)


def load_csv(csv_path: str | Path, classes: Sequence[str] | None = None, split: str = "") -> Dataset:
    """Load a CSV manifest ``image,labels[,mask]`` (paths relative to the CSV)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError("CSV manifest not found", csv_path)
    root = csv_path.parent
    if classes is not None:
        names = ["background"] + [c for c in classes if c != "background"]
    elif (root / "classes.txt").is_file():
        names = read_classes(root / "classes.txt")
    else:
        raise DataError("no class list: put classes.txt beside the CSV or set data.classes", csv_path)
    index = {n: i for i, n in enumerate(names)}
    rows = []
    for line, rel, row in _image_rows(csv_path, "image,labels[,mask]"):
        img = _inside(root, rel, f"line {line}: image", csv_path)
        if not img.is_file():
            raise DataError(f"line {line}: image file '{rel}' not found", csv_path)
        lab = _parse_labels(row.get("labels") or "", index, f"line {line}", csv_path)
        mrel = (row.get("mask") or "").strip()
        mask = None
        if mrel:
            mask = _inside(root, mrel, f"line {line}: mask", csv_path)
            if not mask.is_file():
                raise DataError(f"line {line}: mask file '{mrel}' not found", csv_path)
        rows.append((Path(rel).with_suffix("").as_posix(), img, lab, mask))
    if not rows:
        raise DataError("manifest has no rows", csv_path)
    return _finish(root, names, rows, split, csv_path)


def load_dataset(root: str | Path, split: str = "train", classes: Sequence[str] | None = None) -> Dataset:
    """Load a VOC folder or a CSV manifest, whichever ``root`` is."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return load_csv(root, classes, split)
    return load_voc(root, split, classes)


def _first_duplicate(items: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def dataset_fingerprint(datasets: list[Dataset]) -> str:
    """Hash of ids, labels and image file sizes of ``datasets`` (cheap; catches edits and swaps)."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(f"{ds.split}|{','.join(ds.classes)}\n".encode())
        for s in ds:
            st = s.image.stat()
            h.update(f"{s.id}|{s.labels}|{st.st_size}|{s.mask is not None}\n".encode())
    return h.hexdigest()[:16]

