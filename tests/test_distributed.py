"""torchrun / DistributedDataParallel on CPU (gloo, 2 processes): training runs, its loss goes down, its
checkpoint loads in one process, and it matches one process at the same global batch size."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsss.engine import core as training

BASE = ["configs/demo.yaml", "data.synth.n_train=64", "data.synth.n_val=16", "data.synth.size=64"]


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WSSS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _why(p: subprocess.CompletedProcess) -> str:
    """A failed torchrun's own error lines first: the tail alone is the launcher's traceback."""
    errors = [line for line in p.stderr.splitlines() if "wsss: error" in line or "Error" in line[:80]]
    return "\n".join(errors[:20]) + "\n...\n" + p.stderr[-2000:]


def _log(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_rank_batches_split_the_one_process_batches(monkeypatch):
    from torch.utils.data import DataLoader

    one = training.rank_batches(37, 8, seed=5, drop_last=True)
    loader = DataLoader(list(range(37)), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5), drop_last=True)
    assert one == [b.tolist() for b in loader]
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(training, "world", lambda rank=rank: (rank, 2))
        parts.append(training.rank_batches(37, 8, seed=5, drop_last=True))
    assert all(sorted(a + b) == sorted(g) and len(a) == len(b) == 4 for a, b, g in zip(*parts, one))
    with pytest.raises(Exception, match="not divisible by the 2 processes"):
        training.rank_batches(37, 7, seed=5, drop_last=True)


def test_two_process_classifier_matches_one_process(tmp_path):
    from wsss.cli import main
    from wsss.models.checkpoint import load_classifier

    over = ["train_cls.epochs=4", "train_cls.freeze_bn=true", "train_cls.batch_size=16"]
    p = _torchrun(["train-cls", *BASE, *over, f"run.out_dir={tmp_path / 'ddp'}"])
    assert p.returncode == 0, _why(p)
    assert p.stdout.count("train-cls: trained") == 1  # rank 0 reports, rank 1 stays quiet
    ddp = _log(tmp_path / "ddp" / "cls" / "log.csv")
    assert float(ddp[-1]["loss"]) < float(ddp[0]["loss"])
    model, meta = load_classifier(tmp_path / "ddp" / "cls" / "classifier.pt")  # loads in one process
    assert meta["num_classes"] == 4  # the classifier has no background output
    assert main(["train-cls", *BASE, *over, f"run.out_dir={tmp_path / 'one'}"]) == 0
    one = _log(tmp_path / "one" / "cls" / "log.csv")
    for a, b in zip(ddp, one):  # same global batches: the same training up to float rounding
        assert abs(float(a["loss"]) - float(b["loss"])) < 2e-3, (ddp, one)


def test_two_process_segmenter_trains_and_loads(tmp_path):
    from wsss.models.checkpoint import load_segmenter

    p = _torchrun(["train-seg", "--masks", "gt", *BASE, "train_seg.epochs=3", "train_seg.channels=16",
                   f"run.out_dir={tmp_path / 'seg'}"])
    assert p.returncode == 0, _why(p)
    rows = _log(tmp_path / "seg" / "seg_gt" / "log.csv")
    assert len(rows) == 3 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    model, meta = load_segmenter(tmp_path / "seg" / "seg_gt" / "segmenter.pt")
    assert model(torch.zeros(1, 3, 40, 40)).shape == (1, 5, 40, 40)


def test_two_process_expand_matches_one_process(tmp_path):
    """`wsss expand` under torchrun: both ranks fine-tune (DDP) and extract half the images each, rank 0
    merges; two erasing rounds give the losses and maps of one process, and one manifest."""
    import json
    import shutil

    import numpy as np

    from wsss.camfile import load_cam
    from wsss.cli import main

    one = tmp_path / "one"
    assert main(["run", *BASE, "--to", "cam", "train_cls.epochs=2", "cam.scales=[1.0]", f"run.out_dir={one}"]) == 0
    shutil.copytree(one, tmp_path / "ddp")
    over = ["train_cls.epochs=2", "cam.scales=[1.0]", "expand.methods=[erasing]", "expand.erasing.rounds=2",
            "expand.epochs=2", "train_cls.freeze_bn=true"]
    p = _torchrun(["expand", *BASE, *over, f"run.out_dir={tmp_path / 'ddp'}"])
    assert p.returncode == 0, _why(p)
    assert p.stdout.count("expand: done") == 1, p.stdout
    assert main(["expand", *BASE, *over, f"run.out_dir={one}"]) == 0
    man = [json.loads((d / "expand" / "manifest.json").read_text())["outputs"] for d in (tmp_path / "ddp", one)]
    assert [r["classes_merged"] for r in man[0]["rounds"]] == [r["classes_merged"] for r in man[1]["rounds"]]
    for r in (1, 2):
        a, b = (_log(d / "expand" / f"round_{r}" / "cls" / "log.csv") for d in (tmp_path / "ddp", one))
        assert len(a) == len(b) == 2
        for x, y in zip(a, b):
            assert abs(float(x["loss"]) - float(y["loss"])) < 2e-3, (a, b)
    files = sorted(p.name for p in (one / "expand").glob("*.npz"))
    assert len(files) == 64 and files == sorted(p.name for p in (tmp_path / "ddp" / "expand").glob("*.npz"))
    diffs = []
    for name in files:
        (ca, ma), (cb, mb) = load_cam(tmp_path / "ddp" / "expand" / name), load_cam(one / "expand" / name)
        assert np.array_equal(ca, cb)
        diffs.append(float(np.abs(ma - mb).mean()))
    assert max(diffs) < 0.02, max(diffs)


def test_sync_bn_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(training, "world", lambda: (0, 2))
    with pytest.raises(Exception, match="sync_bn needs CUDA"):
        training.distributed_loss(torch.nn.Linear(2, 2), lambda m, x, y: m(x).sum(), torch.device("cpu"), sync_bn=True)
