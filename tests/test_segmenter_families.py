"""Every segmenter family trained from the CLI on the synthetic set (`wsss train-seg --masks gt`), then
used by `wsss predict`: the loss falls, the checkpoint rebuilds, the predictions are palette PNGs."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BASE = ["data.synth.n_train=24", "data.synth.n_val=6", "data.synth.size=64", "train_seg.crop_size=64", "train_seg.epochs=4",
        "train_seg.batch_size=4", "train_seg.lr=0.01", "train_seg.eval_every=0", "predict.scales=[1.0]", "predict.overlay=false",
        "run.gallery_images=0"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    from wsss.cli import main

    run_dir = tmp_path_factory.mktemp("families") / "run"
    assert main(["run", "configs/demo.yaml", f"run.out_dir={run_dir}", *BASE, "--to", "data"]) == 0
    return run_dir


@pytest.mark.parametrize("arch,extra", [
    ("fcn", ["train_seg.channels=null"]),  # demo.yaml sets DeepLab's head width, which FCN and U-Net do not take
    ("fcn_skip", ["train_seg.channels=null", "train_seg.output_stride=16"]),
    ("unet", ["train_seg.channels=null"]),
    ("hrnet", ["train_seg.channels=32"]),
    ("deeplabv3plus", ["train_seg.channels=32"]),
    ("unet", ["train_seg.channels=null", "train_seg.backbone=timm:resnet18", "train_seg.decoder_channels=[64,32,16,16]"]),
])
def test_train_seg_then_predict_from_the_cli(data_run, tmp_path, run_cli, arch, extra):
    run = tmp_path / "run"
    shutil.copytree(data_run, run)
    args = ["configs/demo.yaml", f"run.out_dir={run}", *BASE, f"train_seg.arch={arch}", *extra]
    code, out, err = run_cli("train-seg", *args, "--masks", "gt")
    assert code == 0, err
    with open(run / "seg_gt" / "log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    code, out, err = run_cli("predict", *args, "--model", run / "seg_gt" / "segmenter.pt", "--out", tmp_path / "pred")
    assert code == 0, err
    pngs = sorted((tmp_path / "pred").glob("*.png"))
    assert len(pngs) == 6
    im = Image.open(pngs[0])
    assert im.mode == "P" and np.array(im).max() <= 4
