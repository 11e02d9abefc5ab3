"""COCO-format datasets (COCO 2014/2017 and any data kept in that format).

Layout: ``ROOT/annotations/instances_<split>.json`` and the split's images in ``ROOT/<split>/`` (e.g.
``train2017``; an image's ``file_name`` may also hold a subfolder). Classes are the JSON's categories in
id order, mapped to contiguous ids 1..K (0 = background); ``data.classes`` keeps a subset (the other
categories' objects count as background). Image-level labels are the categories annotated on an image,
crowd annotations included (a crowd of people still says "person"). An image without annotations has no
labels and is skipped with a warning, as in every source.

Ground-truth masks exist for evaluation only: each is rendered from the image's polygons / RLE with
pycocotools (its ``mask`` module; the ``COCO`` class would print to stdout), larger objects first so
smaller ones stay visible on top, and crowd regions marked 255 (ignored when scoring), the usual rule for
COCO semantic segmentation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from wsss.data.dataset import Dataset, Problems, Sample, _finish, _inside, _problem, did_you_mean
from wsss.errors import DataError
from wsss.io import IGNORE

log = logging.getLogger(__name__)


def is_coco(root: str | Path) -> bool:
    """Whether ``root`` is a COCO-layout folder (``annotations/instances_*.json``)."""
    ann = Path(root) / "annotations"
    return ann.is_dir() and any(ann.glob("instances_*.json"))


def coco_splits(root: str | Path) -> list[str]:
    return sorted(p.stem.removeprefix("instances_") for p in (Path(root) / "annotations").glob("instances_*.json"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", path) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list) or not isinstance(obj.get("categories"), list):
        raise DataError("not a COCO instances file (needs 'images' and 'categories' lists)", path)
    return obj


def render_mask(anns: Sequence[dict], height: int, width: int, cat_to_class: dict[int, int]) -> np.ndarray:
    """``(H, W)`` uint8 class ids of one image from its annotations (polygons, RLE or uncompressed RLE):
    objects painted largest first, crowd regions 255, categories not in ``cat_to_class`` left as they are."""
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), np.uint8)
    crowd = np.zeros((height, width), bool)
    for a in sorted(anns, key=lambda a: -float(a.get("area", 0))):
        seg = a.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, list):  # polygons
            polys = [p for p in seg if len(p) >= 6]
            if not polys:
                continue
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
        m = mask_utils.decode(rle).astype(bool)
        if m.shape != (height, width):
            raise DataError(f"annotation {a.get('id')} is {m.shape[1]}x{m.shape[0]}, its image {width}x{height}")
        if a.get("iscrowd"):
            crowd |= m
        elif a["category_id"] in cat_to_class:
            out[m] = cat_to_class[a["category_id"]]
    out[crowd] = IGNORE
    return out


def load_coco(root: str | Path, split: str = "train2017", classes: Sequence[str] | None = None,
              problems: Problems | None = None) -> Dataset:
    """Load split ``split`` of a COCO-layout folder (see the module docstring)."""
    root = Path(root)
    ann_path = root / "annotations" / f"instances_{split}.json"
    if not ann_path.is_file():
        raise DataError(f"annotation file not found (available splits: {', '.join(coco_splits(root)) or 'none'})", ann_path)
    data = _read_json(ann_path)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    all_names = [c["name"] for c in cats]
    if classes is not None:
        wanted = [c for c in classes if c != "background"]
        for name in wanted:
            if name not in all_names:
                raise DataError(f"class '{name}' is not a category of this file{did_you_mean(name, all_names)}", ann_path)
        names = ["background", *wanted]
    else:
        names = ["background", *all_names]
    by_name = {n: i for i, n in enumerate(names)}
    cat_to_class = {c["id"]: by_name[c["name"]] for c in cats if c["name"] in by_name}
    anns_of: dict[int, list[dict]] = {}
    for a in data.get("annotations", []):
        anns_of.setdefault(a.get("image_id"), []).append(a)
    img_dir = root / split
    rows, keys, sizes, anns_by_sid = [], {}, {}, {}
    for im in data["images"]:
        rel = str(im.get("file_name", ""))
        path = _inside(img_dir, rel, f"image {im.get('id')}", ann_path)
        if not path.is_file():
            _problem(problems, f"image file '{split}/{rel}' not found (image id {im.get('id')})", ann_path)
            continue
        anns = anns_of.get(im["id"], [])
        unknown = {a["category_id"] for a in anns} - {c["id"] for c in cats}
        if unknown:
            _problem(problems, f"image '{rel}': annotations with unknown category id(s) {sorted(unknown)}", ann_path)
            continue
        labels = tuple(sorted({cat_to_class[a["category_id"]] for a in anns if a["category_id"] in cat_to_class}))
        sid = Path(rel).with_suffix("").as_posix()
        rows.append((sid, path, labels, ann_path))
        keys[sid] = hashlib.sha256(json.dumps(anns, sort_keys=True).encode()).hexdigest()[:12]
        sizes[sid] = (int(im["height"]), int(im["width"]))
        anns_by_sid[sid] = anns
    ds = _finish(root, names, rows, split, ann_path, problems)
    ds.samples = [replace(s, mask_key=keys[s.id]) for s in ds.samples]

    def read(sample: Sample) -> np.ndarray:
        h, w = sizes[sample.id]
        return render_mask(anns_by_sid[sample.id], h, w, cat_to_class)

    ds.mask_reader = read
    return ds
