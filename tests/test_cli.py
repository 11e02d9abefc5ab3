from __future__ import annotations

import json

import pytest

from wsss.cli import build_parser, split_overrides

ALL_COMMANDS = ["data", "train-cls", "cam", "expand", "crf", "train-seg", "predict", "eval", "inspect", "export", "run"]


def test_help_lists_every_stage(run_cli):
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0
    help_text = build_parser().format_help()
    for cmd in ALL_COMMANDS:
        assert cmd in help_text


def test_split_overrides():
    rest, over = split_overrides(["run", "c.yaml", "--force", "data", "a.b=1", "x=[1,2]", "--to=cam"])
    assert rest == ["run", "c.yaml", "--force", "data", "--to=cam"] and over == ["a.b=1", "x=[1,2]"]


def test_data_synth_and_check(run_cli, tmp_path):
    code, out, err = run_cli("data", "synth", "--out", tmp_path / "s", "--n-train", "6", "--n-val", "2", "size=64")
    assert code == 0, err
    assert (tmp_path / "s" / "JPEGImages" / "train_00000.jpg").is_file()
    code, out, err = run_cli("data", "check", tmp_path / "s")
    assert code == 0, err
    assert "split train: 6 images" in out and "split val: 2 images" in out and "ok: 8 images" in out


def test_run_writes_layout_and_skips_when_unchanged(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    over = [f"run.out_dir={run_dir}", "data.synth.n_train=6", "data.synth.n_val=2", "data.synth.size=64"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run:\n  name: t\n")
    code, out, err = run_cli("run", cfg, "--to", "data", *over)
    assert code == 0, err
    assert "data       done" in out
    man = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert man["stage"] == "data" and man["inputs"]["dataset"] and man["versions"]["torch"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data" / "index.json").is_file()
    code, out, err = run_cli("run", cfg, "--to", "data", *over)
    assert code == 0 and "up to date" in out
    code, out, err = run_cli("run", cfg, "--to", "data", "--force", "data", *over)
    assert code == 0 and "data       done" in out
    code, out, err = run_cli("run", cfg, "--to", "nonsense", *over)
    assert code == 2 and "unknown stage 'nonsense'" in err


def test_device_flag_sets_every_device_section(run_cli, tmp_path):
    """`--device cpu` reaches every section that picks a device (saved in the resolved config); a GPU
    asked for on a machine without one is a one-line error, not a crash."""
    import yaml

    run = tmp_path / "run"
    code, out, err = run_cli("run", "configs/demo.yaml", "--to", "data", "--device", "cpu", f"run.out_dir={run}",
                             "data.synth.n_train=8", "data.synth.n_val=4", "data.synth.size=64")
    assert code == 0, err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert [cfg[s]["device"] for s in ("train_cls", "cam", "train_seg", "predict")] == ["cpu"] * 4
    import torch

    if not torch.cuda.is_available():
        code, out, err = run_cli("train-cls", "configs/demo.yaml", "--device", "cuda", f"run.out_dir={run}",
                                 "data.synth.n_train=8", "data.synth.n_val=4", "data.synth.size=64")
        assert code == 1 and "CUDA is not available" in err and "Traceback" not in err


def test_crf_maps_needs_sweep(run_cli, tmp_path):
    """`--maps` picks the maps of a sweep; without --sweep it is a one-line error before anything runs."""
    code, out, err = run_cli("crf", "configs/demo.yaml", "--maps", "affinity", f"run.out_dir={tmp_path / 'run'}")
    assert code != 0 and "use it with --sweep" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
