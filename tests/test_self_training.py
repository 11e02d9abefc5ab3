"""The self-training flow (one round: the segmenter's label-restricted, CRF-refined predictions on train
become the next pseudo-masks), and the label restriction it relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsss.inference import restrict_to_labels
from wsss.io import read_mask

TINY = ["data.synth.n_train=16", "data.synth.n_val=6", "data.synth.size=64", "train_cls.epochs=1", "train_cls.crop_size=64",
        "cam.scales=[1.0]", "train_seg.epochs=1", "train_seg.crop_size=64", "run.gallery_images=0", "crf.workers=1"]


def test_restrict_to_labels_keeps_background_and_the_labels():
    rng = np.random.default_rng(0)
    p = rng.random((5, 4, 6)).astype(np.float32)
    p /= p.sum(0, keepdims=True)
    before = p.copy()
    r = restrict_to_labels(p, [2, 4])
    assert np.array_equal(p, before), "input modified"
    assert (r[[1, 3]] == 0).all() and np.allclose(r.sum(0), 1, atol=1e-6)
    assert np.allclose(r[[0, 2, 4]] / r[[0, 2, 4]].sum(0), p[[0, 2, 4]] / p[[0, 2, 4]].sum(0), atol=1e-6)
    assert set(np.unique(r.argmax(0))) <= {0, 2, 4}


@pytest.fixture(scope="module")
def st_run(tmp_path_factory):
    from wsss.cli import main

    run = tmp_path_factory.mktemp("st") / "run"
    assert main(["run", "configs/demo.yaml", f"run.out_dir={run}", *TINY, "--flow", "self-training"]) == 0
    return run


def test_one_round_trains_on_the_label_restricted_predictions_of_train(st_run):
    from wsss.pipeline.runner import open_split

    train = open_split(st_run, "train")
    pred = st_run / "predict" / "train"
    for s in train:
        ids = set(np.unique(read_mask(pred / f"{s.id}.png")).tolist())
        assert ids <= {0, *s.labels}, (s.id, ids, s.labels)  # labels_only: no class the photo is not tagged with
    assert not list(pred.glob("overlay/*"))
    rnd = st_run / "self_training"
    cfg = (rnd / "seg" / "config.yaml").read_text()
    assert f"mask_dir: {pred}" in cfg
    report = json.loads((rnd / "report.json").read_text())["metrics"]
    assert {"seg", "seg_round0"} <= set(report)
    assert 0 <= report["seg"]["mIoU"] <= 100 and 0 <= report["seg_round0"]["mIoU"] <= 100
    assert len(list((rnd / "predict" / "val").glob("*.png"))) == 6


def test_rerun_is_up_to_date_and_prints_both_rounds(st_run, run_cli):
    before = (st_run / "self_training" / "seg" / "segmenter.pt").stat().st_mtime_ns
    code, out, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={st_run}", *TINY, "--flow", "self-training")
    assert code == 0, err
    assert "round 0" in out and "after one round of self-training" in out
    assert (st_run / "self_training" / "seg" / "segmenter.pt").stat().st_mtime_ns == before
