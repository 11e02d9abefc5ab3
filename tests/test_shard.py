"""Sharded per-image stages (cam, crf, predict): `--shard i/N` runs and torchrun ranks write the same
files as one process, and the merge checks that every image was produced exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsss.camfile import load_cam
from wsss.errors import ConfigError
from wsss.shard import parse_shard, shard_ids

from tests.helpers import assert_fp16_close

BASE = ["configs/demo.yaml", "data.synth.n_train=14", "data.synth.n_val=5", "data.synth.size=64", "train_cls.epochs=1",
        "cam.scales=[1.0]", "train_seg.epochs=1", "predict.scales=[1.0]", "run.gallery_images=0"]


def _run(run_cli, run_dir: Path, *args: str) -> str:
    code, out, err = run_cli(*args, *BASE, f"run.out_dir={run_dir}")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with a classifier and a segmenter; stages after them are made per test."""
    from wsss.cli import main

    run_dir = tmp_path_factory.mktemp("shard") / "run"
    assert main(["run", *BASE, f"run.out_dir={run_dir}", "--to", "train-seg"]) == 0
    return run_dir


def _copy_models(src: Path, dst: Path) -> None:
    import shutil

    for name in ("data", "cls", "seg", "config.yaml"):
        p = src / name
        (shutil.copytree if p.is_dir() else shutil.copy)(p, dst / name)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "a/b", "1"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    assert shard_ids(list("abcde"), (1, 2)) == ["b", "d"]


def test_sharded_stages_equal_one_process(trained, tmp_path, run_cli):
    one = trained
    _run(run_cli, one, "cam")
    _run(run_cli, one, "crf", "--workers", "1")
    _run(run_cli, one, "predict")
    many = tmp_path / "many"
    many.mkdir()
    _copy_models(one, many)
    for stage, folder in (("cam", "cam"), ("crf", "crf"), ("predict", "predict/val")):
        extra = ["--workers", "1"] if stage == "crf" else []
        out = _run(run_cli, many, stage, "--shard", "1/3", *extra)
        assert "shard 1/3 done" in out and not (many / folder / "manifest.json").exists()
        if stage == "cam":  # the merge refuses while a shard is missing
            code, _, err = run_cli(stage, *BASE, f"run.out_dir={many}")
            assert code == 1 and "shard(s) 0/3, 2/3 have not finished" in err
        _run(run_cli, many, stage, "--shard", "0/3", *extra)
        _run(run_cli, many, stage, "--shard", "2/3", *extra)
        out = _run(run_cli, many, stage, *extra)
        assert "0 computed" in out or stage != "predict"
        assert (many / folder / "manifest.json").is_file()
    ids = sorted(p.stem for p in (one / "cam").glob("*.npz"))
    assert len(ids) == 14 and ids == sorted(p.stem for p in (many / "cam").glob("*.npz"))
    for sid in ids:
        (c1, m1), (c2, m2) = load_cam(one / "cam" / f"{sid}.npz"), load_cam(many / "cam" / f"{sid}.npz")
        assert np.array_equal(c1, c2) and np.array_equal(m1, m2)
        assert (one / "crf" / f"{sid}.png").read_bytes() == (many / "crf" / f"{sid}.png").read_bytes()
    preds = sorted((one / "predict" / "val").glob("*.png"))
    assert len(preds) == 5
    for p in preds:
        assert p.read_bytes() == (many / "predict" / "val" / p.name).read_bytes()


def test_merge_rejects_overlapping_shards(trained, tmp_path, run_cli):
    from wsss.io import read_json, write_json

    run = tmp_path / "r"
    run.mkdir()
    _copy_models(trained, run)
    _run(run_cli, run, "cam", "--shard", "0/2")
    _run(run_cli, run, "cam", "--shard", "1/2")
    rec = read_json(run / "cam" / "shards" / "1-of-2.json")
    first = read_json(run / "cam" / "shards" / "0-of-2.json")["ids"][0]
    write_json(run / "cam" / "shards" / "1-of-2.json", rec | {"ids": rec["ids"] + [first]})
    code, _, err = run_cli("cam", *BASE, f"run.out_dir={run}")
    assert code == 1 and f"image {first} was produced by shard 0/2 and by shard 1/2" in err
    code, _, err = run_cli("cam", "--shard", "0/2", "--force", *BASE, f"run.out_dir={run}")
    assert code == 2 and "--force cannot be combined with --shard" in err


def test_torchrun_two_ranks_write_the_same_cams(trained, tmp_path, run_cli):
    _run(run_cli, trained, "cam")  # the one-process reference (up to date if another test made it)
    run = tmp_path / "tr"
    run.mkdir()
    _copy_models(trained, run)
    env = {**os.environ, "WSSS_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "wsss",
           "cam", *BASE, f"run.out_dir={run}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(p.name for p in (run / "cam" / "shards").glob("*.json")) == ["0-of-2.json", "1-of-2.json"]
    assert (run / "cam" / "manifest.json").is_file()
    ref = sorted((trained / "cam").glob("*.npz"))
    assert len(ref) == 14 and len(list((run / "cam").glob("*.npz"))) == 14
    for f in ref:  # the reference ran with this process's threads, the ranks with one: within one fp16 ulp
        (c1, m1), (c2, m2) = load_cam(f), load_cam(run / "cam" / f.name)
        assert np.array_equal(c1, c2)
        assert_fp16_close(m1, m2)


def test_fp16_ulp_comparison_accepts_the_last_bit_and_nothing_more():
    a = np.array([0.609375, 1.0, 0.0, 0.5], np.float16)
    last_bit = np.nextafter(a, np.float16(2))
    assert_fp16_close(a, last_bit)
    with pytest.raises(AssertionError, match="1 of 4 values"):
        assert_fp16_close(a, np.where(np.arange(4) == 0, np.nextafter(last_bit, np.float16(2)), a))
