"""Datasets: images + image-level labels (+ optional ground-truth masks, for evaluation only).

Three on-disk sources load into the same :class:`Dataset` (COCO: :mod:`wsss.data.coco`):

* a VOC-layout folder: ``JPEGImages/``, ``SegmentationClass[Aug]/``, ``ImageSets/Segmentation/<split>.txt``,
  ``classes.txt`` (line k = class id k, line 0 = background; the 20 VOC classes when absent), and
  image-level labels from ``labels.csv`` (``image,labels`` with space-separated class names) or, when
  that is absent, from VOC XML ``Annotations/``;
* a CSV manifest ``image,labels[,mask]`` with paths relative to the CSV (classes from ``classes.txt``
  beside it, or given explicitly).

A CSV (``labels.csv`` or a manifest) may start with a UTF-8 byte-order mark (what spreadsheet programs
write); a manifest with a ``split`` column serves each split its own rows.

Policy for problems (each reported as one line naming the file): structural problems are fatal
(:class:`DataError`), unless a ``problems`` list is passed, as `wsss data check` does: then every one is
recorded there (and its row left out) so that one pass lists them all. An image with no labels is
skipped with a warning, because no weakly-supervised stage can learn or extract anything from it.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from wsss.config import VOC_CLASSES
from wsss.errors import DataError
from wsss.io import read_image, read_mask

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image: its id, file, image-level labels (class ids >= 1) and optional mask file (for COCO the
    annotation file, with ``mask_key`` a digest of this image's annotations: the mask is rendered)."""

    id: str
    image: Path
    labels: tuple[int, ...]
    mask: Path | None = None
    mask_key: str = ""


@dataclass
class Dataset:
    """An ordered list of samples with the class names (``classes[0] == 'background'``)."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    split: str = ""
    skipped: list[str] = field(default_factory=list)
    #: renders a sample's ground truth when masks are not PNG files (COCO polygons / RLE)
    mask_reader: Callable[[Sample], np.ndarray] | None = None

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

    def cooccurrence(self) -> np.ndarray:
        """Photo counts ``(num_classes, num_classes)`` int64 from the image-level labels: entry ``(a, b)``
        counts the photos tagged with both classes, the diagonal each class's photos."""
        m = (self.label_matrix() > 0).astype(np.int64)
        return m.T @ m

    def read_image(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB of sample ``i``."""
        return read_image(self.samples[i].image)

    def read_mask(self, i: int) -> np.ndarray:
        """``(H, W)`` uint8 ground-truth ids of sample ``i`` (evaluation and the fully-supervised reference
        only), checked to lie in ``0..K`` or 255."""
        s = self.samples[i]
        if s.mask is None:
            raise DataError(f"image '{s.id}' has no ground-truth mask", self.root)
        if self.mask_reader is not None:
            return self.mask_reader(s)
        return read_mask(s.mask, num_classes=len(self.classes))

    def subset(self, ids: Iterable[str]) -> "Dataset":
        keep = set(ids)
        return self.with_samples([s for s in self.samples if s.id in keep])

    def with_samples(self, samples: list[Sample], split: str | None = None, skipped: list[str] | None = None) -> "Dataset":
        """The same dataset (classes, mask reader) with other samples."""
        return Dataset(self.root, self.classes, samples, self.split if split is None else split,
                       [] if skipped is None else skipped, self.mask_reader)


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


Problems = list[tuple[str, str]]  # (path, message) of every structural problem found


def _problem(problems: Problems | None, message: str, path: str | Path) -> None:
    """Raise ``message`` as a :class:`DataError`, or record it when collecting ``problems``."""
    if problems is None:
        raise DataError(message, path)
    problems.append((str(path), message))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` (case differences first), else ''."""
    known = list(known)
    same_case = [k for k in known if k.lower() == name.lower()]
    close = same_case or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_labels(text: str, index: dict[str, int], where: str, path: Path, problems: Problems | None = None) -> tuple[int, ...]:
    ids = []
    for name in text.replace(",", " ").replace(";", " ").split():
        if name == "background":
            continue
        if name not in index:
            hint = did_you_mean(name, [n for n in index if n != "background"])
            _problem(problems, f"{where}: unknown class '{name}'{hint} (known: {', '.join(list(index)[1:26])})", path)
            continue
        ids.append(index[name])
    return tuple(sorted(set(ids)))


def read_labels_csv(path: Path, classes: Sequence[str], problems: Problems | None = None) -> dict[str, tuple[int, ...]]:
    """Read ``labels.csv`` (``image,labels``) into ``{id: class ids}``; duplicate ids are fatal."""
    index = {n: i for i, n in enumerate(classes)}
    out: dict[str, tuple[int, ...]] = {}
    for line, img, row in _image_rows(path, "image,labels", problems):
        img = Path(img).stem if Path(img).suffix.lower() in IMAGE_EXTS else img
        if img in out:
            _problem(problems, f"line {line}: duplicate image id '{img}'", path)
            continue
        out[img] = _parse_labels(row.get("labels") or "", index, f"line {line}", path, problems)
    return out


def _image_rows(path: Path, columns: str, problems: Problems | None = None):
    """Yield ``(line number, image field, row)`` of a CSV whose header has ``image`` and ``labels``.

    A row with more fields than the header has columns is an error naming its line: its extra fields
    would be dropped (``x.jpg,cow,horse`` under ``image,labels`` keeps only ``cow``)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not a column name
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(f"header must have columns '{columns}'", path)
        for row in reader:
            extra = row.pop(None, None)
            if extra:
                _problem(problems, f"line {reader.line_num}: {len(reader.fieldnames) + len(extra)} fields but the header has "
                         f"{len(reader.fieldnames)} ({','.join(reader.fieldnames)}); write several tags in one field separated "
                         f"by spaces or ';', or quote it (\"cow,horse\")", path)
                continue
            img = (row.get("image") or "").strip()
            if not img:
                _problem(problems, f"line {reader.line_num}: empty image field", path)
                continue
            yield reader.line_num, img, row


def read_voc_xml(path: Path, classes: Sequence[str], problems: Problems | None = None) -> tuple[int, ...]:
    """Image-level labels from one VOC ``Annotations/<id>.xml`` (every ``object/name``)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        _problem(problems, f"invalid XML ({e})", path)
        return ()
    names = " ".join((o.findtext("name") or "").strip() for o in root.iter("object"))
    return _parse_labels(names, {n: i for i, n in enumerate(classes)}, "object", path, problems)


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _finish(root: Path, classes: list[str], rows: list[tuple[str, Path, tuple[int, ...], Path | None]], split: str, where: Path,
            problems: Problems | None = None) -> Dataset:
    samples, skipped, seen = [], [], set()
    for sid, img, labels, mask in rows:
        if sid in seen:
            _problem(problems, f"duplicate image id '{sid}'", where)
            continue
        seen.add(sid)
        if not labels:
            log.warning("%s: image '%s' has no labels; skipped", where, sid)
            skipped.append(sid)
            continue
        samples.append(Sample(sid, img, labels, mask))
    if not samples and not problems:
        raise DataError(f"no usable images in split '{split}'", where)
    return Dataset(root, classes, samples, split, skipped)


# --------------------------------------------------------------------------------------------------
# sources


def load_voc(root: str | Path, split: str = "train", classes: Sequence[str] | None = None, problems: Problems | None = None) -> Dataset:
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
        labels = read_labels_csv(labels_csv, names, problems)
    elif not ann_dir.is_dir():
        raise DataError("no image-level labels: need labels.csv or Annotations/", root)

    mask_dir = next((d for d in (root / "SegmentationClassAug", root / "SegmentationClass") if d.is_dir()), None)
    rows = []
    for sid in ids:
        img = _find_image(img_dir, sid)
        if img is None:
            _problem(problems, f"image '{sid}' listed in {split}.txt has no file in JPEGImages/", split_file)
            continue
        if labels is not None:
            if sid not in labels:
                _problem(problems, f"no row for image '{sid}' (listed in {split}.txt)", labels_csv)
                continue
            lab = labels[sid]
        else:
            xml = ann_dir / f"{sid}.xml"
            if not xml.is_file():
                _problem(problems, f"no annotation for image '{sid}'", xml)
                continue
            lab = read_voc_xml(xml, names, problems)
        mask = None
        if mask_dir is not None and (mask_dir / f"{sid}.png").is_file():
            mask = mask_dir / f"{sid}.png"
        rows.append((sid, img, lab, mask))
    return _finish(root, names, rows, split, labels_csv if labels is not None else split_file, problems)


def load_csv(csv_path: str | Path, classes: Sequence[str] | None = None, split: str = "", problems: Problems | None = None) -> Dataset:
    """Load a CSV manifest ``image,labels[,mask][,split]`` (paths relative to the CSV); with a ``split``
    column, only the rows of ``split``."""
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
    rows, splits = [], set()
    for line, rel, row in _image_rows(csv_path, "image,labels[,mask][,split]", problems):
        if "split" in row:
            splits.add((row.get("split") or "").strip())
            if split and (row.get("split") or "").strip() != split:
                continue
        img = _inside(root, rel, f"line {line}: image", csv_path)
        if not img.is_file():
            _problem(problems, f"line {line}: image file '{rel}' not found", csv_path)
            continue
        lab = _parse_labels(row.get("labels") or "", index, f"line {line}", csv_path, problems)
        mrel = (row.get("mask") or "").strip()
        mask = None
        if mrel:
            mask = _inside(root, mrel, f"line {line}: mask", csv_path)
            if not mask.is_file():
                _problem(problems, f"line {line}: mask file '{mrel}' not found", csv_path)
                continue
        rows.append((Path(rel).with_suffix("").as_posix(), img, lab, mask))
    if splits and split and split not in splits:
        raise DataError(f"no rows of split '{split}' (the split column holds: {', '.join(sorted(splits))})", csv_path)
    if not rows and not problems:
        raise DataError("manifest has no rows", csv_path)
    return _finish(root, names, rows, split, csv_path, problems)


def load_dataset(root: str | Path, split: str = "train", classes: Sequence[str] | None = None,
                 problems: Problems | None = None) -> Dataset:
    """Load a VOC folder, a COCO folder or a CSV manifest, whichever ``root`` is; with ``problems``, record
    every structural problem there (leaving its row out) instead of stopping at the first."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return load_csv(root, classes, split, problems)
    from wsss.data.coco import is_coco, load_coco

    if is_coco(root):
        return load_coco(root, split, classes, problems)
    return load_voc(root, split, classes, problems)


def csv_has_split_column(path: str | Path) -> bool:
    """Whether a CSV manifest's header has a ``split`` column."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return "split" in (next(csv.reader(f), None) or [])


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
            h.update(f"{s.id}|{s.labels}|{st.st_size}|{s.mask is not None}|{s.mask_key}\n".encode())
    return h.hexdigest()[:16]


def carve_split(ds: Dataset, fraction: float, val_name: str) -> tuple[Dataset, Dataset]:
    """``(train, val)``: the images of ``ds`` whose id hashes below ``fraction`` become split ``val_name``
    (at least one image each side when ``ds`` has two or more), the rest stay. A hash, not a shuffle: an
    image keeps its side when others are added or removed."""
    def u(sid: str) -> float:
        return int(hashlib.sha256(f"wsss-val|{sid}".encode()).hexdigest()[:12], 16) / 16**12

    scores = {s.id: u(s.id) for s in ds}
    val = {sid for sid, v in scores.items() if v < fraction}
    if len(ds) >= 2 and not val:
        val = {min(scores, key=scores.get)}
    if len(ds) >= 2 and len(val) == len(ds):
        val.discard(max(scores, key=scores.get))
    return ds.with_samples([s for s in ds if s.id not in val], skipped=ds.skipped), ds.with_samples([s for s in ds if s.id in val], val_name)
