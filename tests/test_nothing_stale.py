"""Nothing stale, nothing silently dropped: outputs are keyed however deep they sit, a run directory has one
user at a time, input problems are errors naming the line (all of them in one `data check`), a CSV can
carry its own val split, file names are data, the config fails fast and names the source of a bad value,
and memory per photo is bounded. Each test fails on the code before these fixes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_voc

TINY = ["data.synth.n_train=16", "data.synth.n_val=6", "data.synth.size=64", "train_cls.epochs=1", "train_cls.crop_size=64",
        "cam.scales=[1.0]", "train_seg.epochs=1", "train_seg.crop_size=64", "run.gallery_images=0", "crf.workers=1"]


def _error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("wsss: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _env() -> dict:
    return {**os.environ, "WSSS_PROGRESS": "0"}


@pytest.fixture(scope="module")
def nested_csv(tmp_path_factory) -> Path:
    """A CSV manifest whose images sit in a subfolder (ids like ``photos/train_00003``), with a split
    column and masks: the synthetic set re-laid out the way users keep their photos."""
    from wsss.data.synth import generate
    from wsss.config import SynthConfig

    base = tmp_path_factory.mktemp("nested")
    synth = generate(SynthConfig(n_train=16, n_val=6, size=64), base / "synth")
    root = base / "mine"
    shutil.copytree(synth / "JPEGImages", root / "photos")
    shutil.copytree(synth / "SegmentationClass", root / "masks")
    shutil.copy(synth / "classes.txt", root / "classes.txt")
    rows = ["image,labels,mask,split"]
    for line in (synth / "labels.csv").read_text().splitlines()[1:]:
        sid, labels = line.split(",", 1)
        rows.append(f"photos/{sid}.jpg,{labels},masks/{sid}.png,{sid.split('_')[0]}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return root / "tags.csv"


def _nested_args(csv: Path, run: Path, *extra: str) -> list[str]:
    return ["configs/demo.yaml", "data.source=csv", f"data.root={csv}", f"run.out_dir={run}", *TINY, *extra]


def _outputs(run: Path, folder: str) -> dict:
    return json.loads((run / folder / "manifest.json").read_text())["outputs"]


def test_changed_config_recomputes_outputs_in_subfolders(nested_csv, tmp_path, run_cli):
    run = tmp_path / "run"
    code, _, err = run_cli("run", *_nested_args(nested_csv, run))
    assert code == 0, err
    cams = sorted((run / "cam" / "photos").glob("*.npz"))
    assert len(cams) == 16 and (run / "predict" / "val" / "photos").is_dir()
    before = {p.name: p.read_bytes() for p in cams}
    code, _, err = run_cli("run", *_nested_args(nested_csv, run, "cam.method=gradcam", "crf.mode=probability", "predict.scales=[1.0,0.75]"))
    assert code == 0, err
    for folder in ("cam", "crf", "predict/val"):
        o = _outputs(run, folder)
        assert o["computed"] == o["images"] and o.get("reused", 0) == 0, (folder, o)
    assert any((run / "cam" / "photos" / n).read_bytes() != b for n, b in before.items()), "the old maps were kept"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from wsss.cli import main

    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", "configs/demo.yaml", f"run.out_dir={run}", *TINY]) == 0
    return run


def test_predict_out_folder_of_another_model_is_recomputed(tiny_run, tmp_path, run_cli):
    photos = tmp_path / "photos"
    shutil.copytree(tiny_run / "data" / "synth" / "JPEGImages", photos)
    out = tmp_path / "out"
    model_a = tiny_run / "seg" / "segmenter.pt"
    code, stdout, err = run_cli("predict", "--model", model_a, "--input", photos, "--out", out)
    assert code == 0 and "(22 computed)" in stdout, err
    model_b = tmp_path / "b.pt"
    obj = torch.load(model_a, weights_only=True)
    obj["model"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in obj["model"].items()}
    torch.save(obj, model_b)
    code, stdout, err = run_cli("predict", "--model", model_b, "--input", photos, "--out", out)
    assert code == 0 and "(22 computed)" in stdout, (stdout, err)
    assert json.loads((out / "manifest.json").read_text())["outputs"]["model"] == str(model_b)


def _slow_training(run: Path) -> list[str]:
    return [sys.executable, "-m", "wsss", "-q", "train-cls", "configs/demo.yaml", f"run.out_dir={run}", *TINY,
            "train_cls.epochs=400"]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_second_process_on_a_run_directory_is_refused_until_the_first_dies(tmp_path, run_cli):
    run = tmp_path / "run"
    first = subprocess.Popen(_slow_training(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run / "cls" / "log.csv", first)  # training, one epoch done
        code, _, err = run_cli("train-cls", "configs/demo.yaml", f"run.out_dir={run}", *TINY)
        assert code == 1 and f"in use by another wsss process (pid {first.pid})" in _error(err)
        code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={run}", *TINY)
        assert code == 1 and f"pid {first.pid}" in _error(err)
    finally:
        first.kill()
        first.wait(10)
    # killed: the lock died with its holder
    code, out, err = run_cli("train-cls", "configs/demo.yaml", f"run.out_dir={run}", *TINY)
    assert code == 0, err


def test_sigterm_is_handled_like_ctrl_c_and_a_rerun_finishes(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_slow_training(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "cls" / "log.csv", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "wsss: terminated" and "Traceback" not in err and "leaked" not in err, err
    assert not list(run.rglob(".*.tmp*"))
    done = subprocess.run(_slow_training(run)[:-1] + ["train_cls.epochs=3"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _csv_root(tmp_path: Path, rows: str, header: str = "image,labels") -> Path:
    root = tmp_path / "d"
    (root / "photos").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / "photos" / f"{name}.jpg")
    (root / "classes.txt").write_text("background\ncow\nhorse\nperson\n")
    (root / "tags.csv").write_text(f"{header}\n{rows}", encoding="utf-8")
    return root / "tags.csv"


def test_extra_csv_fields_are_an_error_naming_the_line(tmp_path, run_cli):
    csv = _csv_root(tmp_path, "photos/a.jpg,cow\nphotos/b.jpg,cow,horse,person\n")
    code, out, err = run_cli("data", "check", csv)
    assert code == 1 and "line 3" in err and "4 fields but the header has 2" in err and "no problems" not in out
    from wsss.data.dataset import load_csv
    from wsss.errors import DataError

    with pytest.raises(DataError, match="line 3"):
        load_csv(csv)
    quoted = _csv_root(tmp_path / "q", 'photos/a.jpg,cow\nphotos/b.jpg,"cow,horse,person"\n')
    assert load_csv(quoted).samples[1].labels == (1, 2, 3)


def test_csv_with_a_byte_order_mark_loads(tmp_path, run_cli):
    csv = _csv_root(tmp_path, "photos/a.jpg,cow\nphotos/b.jpg,horse\n", header="\ufeffimage,labels")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    code, out, err = run_cli("data", "check", csv)
    assert code == 0 and "no problems" in out, err


def test_data_check_lists_every_problem_in_one_pass(tmp_path, run_cli):
    voc = make_voc(tmp_path / "voc", {"a": ("cat", (20, 20)), "b": ("dog", (20, 20)), "c": ("Dog", (20, 20)), "d": ("cat", (20, 20))})
    (voc / "JPEGImages" / "a.jpg").unlink()
    path = voc / "JPEGImages" / "b.jpg"
    path.write_bytes(path.read_bytes()[:40])
    code, out, err = run_cli("data", "check", voc)
    assert code == 1 and "3 problem(s)" in err, err
    assert "'a' listed in train.txt has no file" in err and "b.jpg" in err and "unknown class 'Dog' (did you mean 'dog'?)" in err


def test_near_miss_class_name_gets_a_suggestion(tmp_path):
    from wsss.data.dataset import load_csv
    from wsss.errors import DataError

    csv = _csv_root(tmp_path, "photos/a.jpg,cow\nphotos/b.jpg,hrose\n")
    with pytest.raises(DataError, match=r"line 3: unknown class 'hrose' \(did you mean 'horse'\?\)"):
        load_csv(csv)


def test_csv_split_column_and_val_fraction(nested_csv, tmp_path, run_cli, caplog):
    from wsss.pipeline.runner import open_split

    run = tmp_path / "split"
    code, _, err = run_cli("run", *_nested_args(nested_csv, run), "--to", "data")
    assert code == 0, err
    assert len(open_split(run, "train")) == 16 and len(open_split(run, "val")) == 6
    assert not _outputs(run, "data")["warnings"]
    flat = nested_csv.parent / "flat.csv"  # the same rows without the split column
    flat.write_text("\n".join(",".join(r.split(",")[:3]) for r in nested_csv.read_text().splitlines()) + "\n")
    run = tmp_path / "same"
    code, _, err = run_cli("run", *_nested_args(flat, run), "--to", "data")
    assert code == 0 and "val split is the training split" in err
    assert "training split" in _outputs(run, "data")["warnings"][0]
    run = tmp_path / "carved"
    code, _, err = run_cli("run", *_nested_args(flat, run, "data.val_fraction=0.25"), "--to", "data")
    assert code == 0 and "training split" not in err, err
    train, val = open_split(run, "train"), open_split(run, "val")
    assert len(train) + len(val) == 22 and 2 <= len(val) <= 11 and not {s.id for s in train} & {s.id for s in val}
    code, _, err = run_cli("run", *_nested_args(flat, tmp_path / "again", "data.val_fraction=0.25"), "--to", "data")
    assert [s.id for s in open_split(tmp_path / "again", "val")] == [s.id for s in val], "the carve is deterministic"


def test_report_says_when_val_is_train(tmp_path):
    from wsss.pipeline.report import collect, summary_lines

    run = tmp_path / "r"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"outputs": {"warnings": ["the val split is the training split (4 images)"]}}))
    rep = collect(run)
    assert rep["warnings"] == ["data: the val split is the training split (4 images)"]
    assert any("WARNING data: the val split is the training split" in ln for ln in summary_lines(rep))
    from wsss.pipeline.report import render_html

    page = render_html(rep)
    assert "Warning: data: the val split is the training split" in page
    assert "the eval stage has not run" in page and "no ground truth" not in page  # not run is not "no ground truth"


def test_gallery_links_survive_any_file_name(tmp_path):
    from wsss.data.dataset import load_csv
    from wsss.pipeline.gallery import build_gallery, render_gallery

    root = tmp_path / "d"
    names = ["a#1", "b?x=2", "c%20d", "e f", "ünï"]
    (root / "p").mkdir(parents=True)
    for n in names:
        Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(root / "p" / f"{n}.png")
    (root / "classes.txt").write_text("background\ncat\n")
    (root / "m.csv").write_text("image,labels\n" + "".join(f"p/{n}.png,cat\n" for n in names), encoding="utf-8")
    ds = load_csv(root / "m.csv")
    out = tmp_path / "gallery"
    page = render_gallery(build_gallery(ds, tmp_path / "run", out, None, 0), ds.classes, "t")
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) == len(names)
    for src in srcs:
        import html

        url = html.unescape(src)
        assert (out / unquote(urlsplit(url).path)).is_file(), url


@pytest.mark.parametrize("override,key", [("train_seg.arch=nope", "train_seg.arch"), ("expand.methods=[nope]", "expand.methods"),
                                          ("cam.method=nope", "cam.method"), ("train_cls.backbone=nope", "train_cls.backbone"),
                                          ("data.source=voc", "data.root"), ("crf.source=expand", "crf.source"),
                                          ("train_cls.backbone=timm:resnet5", "train_cls.backbone"),
                                          ("train_seg.arch=unet train_seg.rates=[2,4]", "train_seg.rates")])
def test_bad_names_fail_before_any_stage_runs(tmp_path, run_cli, override, key):
    run = tmp_path / "run"
    extra = [override, f"data.root={tmp_path / 'nowhere'}"] if override == "data.source=voc" else override.split()
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={run}", *TINY, *extra)
    assert code == 2 and f"config key '{key}'" in _error(err)
    assert not run.exists(), "something ran before the config was checked"


def test_reversed_stage_slice_is_a_usage_error(tiny_run, run_cli):
    before = (tiny_run / "report.json").stat().st_mtime_ns
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={tiny_run}", *TINY, "--from", "predict", "--to", "cam")
    assert code == 2 and "--from predict comes after --to cam" in _error(err)
    assert (tiny_run / "report.json").stat().st_mtime_ns == before


def test_errors_name_the_override_or_the_yaml_line(tmp_path, run_cli):
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={tmp_path / 'r'}", "train_cls.epochs=abc")
    line = _error(err)
    assert code == 2 and line.startswith("wsss: error: override train_cls.epochs=abc: config key 'train_cls.epochs'")
    assert "demo.yaml" not in line
    own = tmp_path / "own.yaml"
    own.write_text("run:\n  name: x\ndata:\n  source: synth\ntrain_cls:\n  epochs: 3 lr: 0.1\n")
    code, _, err = run_cli("run", own)
    assert code == 2 and "own.yaml: invalid YAML at line 6: mapping values are not allowed here" in _error(err)


def test_all_zero_maps_and_all_background_masks_are_warned_about(tiny_run, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ck = torch.load(run / "cls" / "classifier.pt", weights_only=True)
    ck["model"] = {k: torch.zeros_like(v) if k.startswith("classifier") else v for k, v in ck["model"].items()}
    torch.save(ck, run / "cls" / "classifier.pt")
    code, _, err = run_cli("cam", "configs/demo.yaml", f"run.out_dir={run}", *TINY, "--force")
    assert code == 0 and "every map of the 16 images is zero" in err, err
    code, _, err = run_cli("crf", "configs/demo.yaml", f"run.out_dir={run}", *TINY, "--force")
    assert code == 0 and "all 16 pseudo-masks are background or ignore only" in err, err
    assert _outputs(run, "crf")["warnings"]


def test_a_huge_photo_is_processed_at_the_capped_side_and_written_at_its_own(monkeypatch):
    from wsss.cam.extract import extract_cams
    from wsss.config import CrfConfig
    from wsss.crf import pseudo_mask
    from wsss.crf import pool

    seen = []

    class Spy:  # a CAM method that records the input sizes it is given
        def __call__(self, x, classes):
            seen.append(tuple(x.shape[-2:]))
            return x[:, :1].expand(-1, len(classes), -1, -1).clamp(min=0)

    photo = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    (_, classes, cams), = extract_cams(Spy(), [("x", photo, [1])], mean=(0.5,) * 3, std=(0.5,) * 3, scales=[1.0, 2.0], flip=False,
                                       max_side=100)
    assert cams.shape == (1, 300, 500) and max(max(s) for s in seen) <= 200, seen
    shapes = []
    monkeypatch.setattr(pool, "pseudo_mask", lambda im, c, m, cfg: (shapes.append(im.shape), pseudo_mask(im, c, m, cfg))[1])
    monkeypatch.setattr(pool, "load_cam", lambda path, k, size=None: (classes.astype(np.int64), cams))
    monkeypatch.setattr(pool, "read_image", lambda path: photo)
    written = {}
    monkeypatch.setattr(pool, "write_palette_png", lambda path, mask: written.setdefault("mask", mask))
    pool.crf_one(("x", "x.jpg", "x.npz", "x.png"), CrfConfig(max_side=100), 1)
    assert shapes == [(60, 100, 3)] and written["mask"].shape == (300, 500)


def test_unreadable_photo_is_skipped_and_reported(tiny_run, tmp_path, run_cli):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    src = sorted((tiny_run / "data" / "synth" / "JPEGImages").glob("*.jpg"))
    for p in src[:3]:
        shutil.copy(p, photos / p.name)
    shutil.copy(src[3], photos / "trip" / "deep.jpg")
    (photos / "broken.jpg").write_bytes(src[4].read_bytes()[:50])
    out = tmp_path / "out"
    code, stdout, err = run_cli("predict", "--model", tiny_run / "seg" / "segmenter.pt", "--input", photos, "--out", out, "--recursive")
    assert code == 1 and "1 unreadable image(s) skipped" in _error(err) and "broken.jpg" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        [f"{p.stem}.png" for p in src[:3]] + ["trip/deep.png"])


def _running(pid: str) -> bool:
    """Whether process ``pid`` still runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sigterm_during_the_crf_worker_pool_leaves_no_worker_and_no_leak(tmp_path, run_cli):
    over = ["data.synth.n_train=240", "data.synth.n_val=4", "data.synth.size=160", "train_cls.epochs=1", "train_cls.crop_size=64",
            "cam.scales=[1.0]", "crf.iterations=30", "run.gallery_images=0"]
    run = tmp_path / "run"
    code, _, err = run_cli("run", "configs/demo.yaml", f"run.out_dir={run}", *over, "--to", "cam")
    assert code == 0, err
    cmd = [sys.executable, "-m", "wsss", "crf", "configs/demo.yaml", f"run.out_dir={run}", *over, "--workers", "2"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list((run / "crf").glob("*.png"))) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) >= 2, "the worker pool is running"  # 2 workers (and the resource tracker)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "wsss: terminated", err
    assert "Traceback" not in err and "leaked" not in err, err
    deadline = time.time() + 10
    while any(map(_running, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _running(pid)], "a worker outlived the command"
    assert not list(run.rglob(".*.tmp*"))
    code, _, err = run_cli("crf", "configs/demo.yaml", f"run.out_dir={run}", *over, "--workers", "2")
    assert code == 0 and _outputs(run, "crf")["images"] == 240, err


def test_generator_settings_are_not_in_a_real_dataset_s_key():
    """The synthetic generator's settings key the data stage (and so every later stage) only when the data
    is synthetic: a VOC run is not recomputed because synth defaults changed."""
    from wsss.config import config_hash, load_config
    from wsss.stages.data import section

    def key(*over):
        return config_hash(section(load_config(None, list(over))))

    voc = ("data.source=voc", "data.root=.")
    assert key(*voc) == key(*voc, "data.synth.size=64")
    assert key(*voc) != key(*voc, "data.train_split=trainaug")
    assert key() != key("data.synth.size=64")  # synthetic data: the generator makes it
