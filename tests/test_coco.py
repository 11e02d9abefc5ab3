"""COCO-format datasets: a small fixture made here (images + instances JSON with polygons, compressed and
uncompressed RLE, a crowd region and non-contiguous category ids), loaded, checked and run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.coco import load_coco, render_mask
from wsss.data.dataset import load_dataset
from wsss.errors import DataError
from wsss.io import IGNORE

CATS = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 11, "name": "bird"}]  # ids out of order, with gaps


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    from pycocotools import mask as mask_utils

    if compressed:
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode()}
    flat = mask.astype(np.uint8).flatten(order="F")  # column-major runs, starting with zeros
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_coco(root: Path, n_train: int = 12, n_val: int = 4, size: int = 48) -> Path:
    """Each image: a cat (polygon) and/or a dog (RLE) drawn as bright squares on a dark noisy photo."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    ann_id = 1
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            iid = 100 + i if split == "train" else 900 + i
            name = f"{split}_{i:03d}.jpg"
            kinds = [("cat",), ("dog",), ("cat", "dog")][i % 3]
            for k in kinds:
                m = np.zeros((size, size), bool)
                if k == "cat":
                    x0, y0 = 4 + i % 5, 6
                    img[y0:y0 + 16, x0:x0 + 16] = (230, 120, 40)
                    seg, cat, area = _rect(x0, y0, x0 + 16, y0 + 16), 3, 256
                else:
                    m[26:42, 24:44] = True
                    img[m] = (40, 120, 230)
                    seg, cat, area = _rle(m, compressed=i % 2 == 0), 7, int(m.sum())
                anns.append({"id": ann_id, "image_id": iid, "category_id": cat, "segmentation": seg, "area": area,
                             "iscrowd": 0, "bbox": [0, 0, 1, 1]})
                ann_id += 1
            if i == 1:  # a crowd of cats: labels say cat, its pixels are ignored when scoring
                cm = np.zeros((size, size), bool)
                cm[40:46, 2:10] = True
                anns.append({"id": ann_id, "image_id": iid, "category_id": 3, "segmentation": _rle(cm, False),
                             "area": int(cm.sum()), "iscrowd": 1, "bbox": [0, 0, 1, 1]})
                ann_id += 1
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append({"id": iid, "file_name": name, "height": size, "width": size})
        if split == "train":  # an image nobody annotated: no labels, skipped with a warning
            Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8)).save(root / split / "empty.jpg")
            images.append({"id": 5, "file_name": "empty.jpg", "height": size, "width": size})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": CATS}))
    return root


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco") / "coco")


def test_categories_become_contiguous_classes_and_labels(coco, caplog):
    ds = load_dataset(coco, "train")  # recognised by its layout
    assert ds.classes == ["background", "cat", "dog", "bird"]  # category id order: 3, 7, 11
    assert len(ds) == 12 and ds.skipped == ["empty"] and "no labels" in caplog.text
    by_id = {s.id: s.labels for s in ds}
    assert by_id["train_000"] == (1,) and by_id["train_002"] == (1, 2) and by_id["train_004"] == (2,)
    assert by_id["train_001"] == (1, 2)  # a dog and a crowd of cats: crowds count as labels
    assert ds.has_masks


def test_masks_render_polygons_rle_and_crowds(coco):
    ds = load_coco(coco, "train")
    ids = [s.id for s in ds]
    m0 = ds.read_mask(ids.index("train_000"))  # polygon cat at x 4..20, y 6..22
    assert m0.shape == (48, 48) and m0[10, 10] == 1 and m0[30, 30] == 0
    m1 = ds.read_mask(ids.index("train_001"))  # uncompressed-RLE dog + a crowd
    assert m1[30, 30] == 2 and (m1[40:46, 2:10] == IGNORE).all() and m1[0, 0] == 0
    m2 = ds.read_mask(ids.index("train_002"))  # compressed RLE dog and a polygon cat
    assert m2[30, 30] == 2 and m2[10, 10] == 1
    assert set(np.unique(m2)) <= {0, 1, 2}


def test_smaller_objects_stay_on_top_and_classes_can_be_a_subset(coco):
    big = {"category_id": 3, "segmentation": _rect(0, 0, 20, 20), "area": 400, "iscrowd": 0}
    small = {"category_id": 7, "segmentation": _rect(5, 5, 10, 10), "area": 25, "iscrowd": 0}
    m = render_mask([small, big], 24, 24, {3: 1, 7: 2})
    assert m[7, 7] == 2 and m[15, 15] == 1
    only_dog = load_coco(coco, "train", classes=["dog"])
    assert only_dog.classes == ["background", "dog"]
    assert all(s.labels == (1,) for s in only_dog)  # the cat-only images have no labels left: skipped
    assert len(only_dog) == 8 and "train_000" in only_dog.skipped
    i = [s.id for s in only_dog].index("train_002")
    assert only_dog.read_mask(i)[10, 10] == 0 and only_dog.read_mask(i)[30, 30] == 1  # the cat is background now


def test_bad_coco_input_is_named(coco, tmp_path):
    with pytest.raises(DataError, match=r"available splits: train, val"):
        load_coco(coco, "train2017")
    with pytest.raises(DataError, match="class 'dgo' is not a category of this file \\(did you mean 'dog'\\?\\)"):
        load_coco(coco, "train", classes=["dgo"])
    bad = make_coco(tmp_path / "bad", n_train=2, n_val=1)
    data = json.loads((bad / "annotations" / "instances_train.json").read_text())
    data["annotations"][0]["category_id"] = 99
    (bad / "annotations" / "instances_train.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"unknown category id\(s\) \[99\]"):
        load_coco(bad, "train")


def test_data_check_recognises_coco(coco, run_cli):
    code, out, err = run_cli("data", "check", coco)
    assert code == 0, err
    assert "split train: 12 images (1 skipped), 12 with masks" in out and "split val: 4 images" in out


def test_weakly_supervised_stages_never_render_a_mask(coco, tmp_path, run_cli, monkeypatch):
    """Masks are for evaluation only. The data stage validates them (a broken annotation fails in seconds,
    not at the eval stage); from train-cls to the pseudo-masks, rendering is forbidden and the run passes."""
    import wsss.data.coco as coco_mod

    run = tmp_path / "run"
    code, out, err = run_cli("run", "configs/demo.yaml", *_coco_args(coco, run), "--to", "data")
    assert code == 0, err

    def forbidden(*a, **k):
        raise AssertionError("a weakly-supervised stage read a ground-truth mask")

    monkeypatch.setattr(coco_mod, "render_mask", forbidden)
    # (the gallery beside the report shows ground truth to the user: off here)
    code, out, err = run_cli("run", "configs/demo.yaml", *_coco_args(coco, run), "run.gallery_images=0", "--from", "train-cls", "--to", "crf")
    assert code == 0, err
    assert len(list((run / "crf").glob("*.png"))) == 12


def _coco_args(root: Path, run: Path) -> list[str]:
    return [f"run.out_dir={run}", "data.source=coco", f"data.root={root}", "data.train_split=train", "data.val_split=val",
            "train_cls.epochs=2", "train_cls.crop_size=48", "cam.scales=[1.0]", "train_seg.epochs=2", "train_seg.crop_size=48",
            "run.gallery_images=4", "crf.workers=1"]


def test_the_whole_pipeline_runs_on_coco(coco, tmp_path, run_cli):
    run = tmp_path / "run"
    code, out, err = run_cli("run", "configs/demo.yaml", *_coco_args(coco, run))
    assert code == 0, err
    summary = json.loads((run / "report.json").read_text())["metrics"]
    assert {"cam", "crf", "seg"} <= set(summary) and 0 <= summary["seg"]["mIoU"] <= 100
    assert len(list((run / "predict" / "val").glob("*.png"))) == 4


def test_coco_source_on_another_layout_fails_before_any_stage(tmp_path, run_cli, voc):
    run = tmp_path / "run"
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={run}", "data.source=coco", f"data.root={voc}")
    assert code == 2 and "is not a COCO folder" in err and not run.exists()
