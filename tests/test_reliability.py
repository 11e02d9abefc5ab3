"""Faults injected into a finished tiny run: bad CAM files, bad pseudo-masks, bad checkpoints, an output
folder that cannot be written, a disk that fills up mid-stage. Each must end in one line naming the file
or key and a non-zero exit, leave no temp file, and let a re-run (once the fault is gone) finish with the
same outputs as a run that never failed. Also: two runs with the same seed are bit-identical on CPU."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.camfile import load_cam
from wsss.io import write_palette_png

TINY = ["data.synth.n_train=16", "data.synth.n_val=6", "data.synth.size=64", "train_cls.epochs=1", "train_cls.crop_size=64",
        "cam.scales=[1.0]", "train_seg.epochs=1", "train_seg.crop_size=64", "run.gallery_images=0", "crf.workers=1"]


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["configs/demo.yaml", f"run.out_dir={run_dir}", *TINY, *extra]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("wsss: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _digests(folder: Path, pattern: str = "*.png") -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def _temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.rglob(".*.tmp*"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from wsss.cli import main

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", *_args(run_dir)]) == 0
    return run_dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    # the copy's configs point at the original folder only through run.out_dir, which every command overrides
    return dst


def _first_cam(run_dir: Path) -> Path:
    return sorted((run_dir / "cam").glob("*.npz"))[0]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("fault,needle", [
    ("shape", "shape"), ("nan", "NaN"), ("negative", "values must be in [0, 1]"), ("size", "differs from its image"),
    ("classes", "outside 1..4"), ("garbage", "not a wsss CAM file"),
])
def test_bad_cam_file_stops_crf_with_one_line(run_copy, run_cli, fault, needle, workers):
    path = _first_cam(run_copy)
    classes, cam = load_cam(path)
    if fault == "shape":
        cam = np.concatenate([cam, cam])  # two maps for one class list
    elif fault == "nan":
        cam[0, 0, 0] = np.nan
    elif fault == "negative":
        cam[0, 0, 0] = -0.5
    elif fault == "size":
        cam = cam[:, :-3]
    elif fault == "classes":
        classes = np.full_like(classes, 9)
    if fault == "garbage":
        path.write_bytes(b"not an npz")
    else:
        np.savez(path, classes=classes.astype(np.int16), cam=cam.astype(np.float16))
    code, out, err = run_cli("crf", *_args(run_copy, f"crf.workers={workers}"), "--force")
    assert code == 1
    line = _one_line(err)
    assert path.name in line and needle in line, line
    assert not _temp_files(run_copy)
    assert not (run_copy / "crf" / "manifest.json").exists()


def test_bad_cam_file_stops_eval_cam(run_copy, run_cli):
    path = _first_cam(run_copy)
    classes, cam = load_cam(path)
    cam[0, 1, 1] = np.inf
    np.savez(path, classes=classes.astype(np.int16), cam=cam.astype(np.float16))
    code, out, err = run_cli("eval", "cam", *_args(run_copy), "--cams", run_copy / "cam")
    assert code == 1 and path.name in _one_line(err) and "NaN or infinite" in err


@pytest.mark.parametrize("workers", [0, 1])
def test_pseudo_mask_with_out_of_range_ids_stops_train_seg(run_copy, run_cli, workers):
    png = sorted((run_copy / "crf").glob("*.png"))[3]
    mask = np.array(Image.open(png))
    mask[:2, :2] = 9  # 4 classes + background: ids 0..4
    write_palette_png(png, mask)
    code, out, err = run_cli("train-seg", *_args(run_copy, f"train_seg.workers={workers}"), "--force")
    assert code == 1
    line = _one_line(err)
    assert png.name in line and "class id 9 outside 0..4" in line, line
    code, out, err = run_cli("eval", "masks", *_args(run_copy))
    assert code == 1 and png.name in _one_line(err) and "outside 0..4" in err


def test_truncated_classifier(run_copy, run_cli):
    ck = run_copy / "cls" / "classifier.pt"
    ck.write_bytes(ck.read_bytes()[:5000])
    code, out, err = run_cli("cam", *_args(run_copy), "--force")
    assert code == 1
    line = _one_line(err)
    assert "classifier.pt" in line and "cannot load checkpoint" in line


def test_truncated_training_checkpoint_names_the_way_out(run_copy, run_cli):
    """A half-written checkpoint cannot come from wsss (writes are atomic), but a copy can be cut short."""
    ck = run_copy / "seg" / "checkpoint.pt"
    shutil.copyfile(run_copy / "seg" / "segmenter.pt", ck) if not ck.exists() else None
    ck.write_bytes(ck.read_bytes()[:3000])
    (run_copy / "seg" / "manifest.json").unlink()
    code, out, err = run_cli("train-seg", *_args(run_copy))
    assert code == 1
    line = _one_line(err)
    assert "checkpoint.pt" in line and "cannot load checkpoint" in line and "--no-resume" in line, line


def test_classifier_from_another_backbone(run_copy, run_cli):
    ck = run_copy / "cls" / "classifier.pt"
    obj = torch.load(ck, weights_only=True)
    obj["meta"]["backbone"] = "resnet18"
    torch.save(obj, ck)
    code, out, err = run_cli("cam", *_args(run_copy), "--force")
    assert code == 1
    line = _one_line(err)
    assert "classifier.pt" in line and "do not fit backbone 'resnet18'" in line


def test_classifier_given_as_segmenter(run_copy, run_cli, tmp_path):
    img = next((run_copy / "data" / "synth" / "JPEGImages").glob("*.jpg"))
    code, out, err = run_cli("predict", "--model", run_copy / "cls" / "classifier.pt", "--input", img, "--out", tmp_path / "p")
    assert code == 1 and "not a wsss segmenter file" in _one_line(err)


def test_checkpoint_with_pickled_code_is_refused(run_copy, run_cli):
    """weights_only=True: a checkpoint that would run code on load is refused, and the code never runs."""
    marker = run_copy / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Evil(), "meta": {}}, run_copy / "cls" / "classifier.pt")
    code, out, err = run_cli("cam", *_args(run_copy), "--force")
    assert code == 1 and "cannot load checkpoint" in _one_line(err)
    assert not marker.exists()


def test_output_folder_not_writable(run_cli, tmp_path):
    # /sys refuses new folders even to root (tests may run as root, where chmod does not protect)
    code, out, err = run_cli("run", *_args(Path("/sys/wsss-test-run")))
    assert code == 1
    line = _one_line(err)
    assert "/sys/wsss-test-run" in line


def test_output_file_not_writable(run_copy, run_cli):
    """A path in the way (a file where the stage folder should be)."""
    shutil.rmtree(run_copy / "crf")
    (run_copy / "crf").write_text("in the way")
    code, out, err = run_cli("crf", *_args(run_copy))
    assert code == 1 and "crf" in _one_line(err)


def test_disk_full_mid_crf_then_rerun_matches(run_copy, run_cli, tiny_run, monkeypatch):
    """The 4th PNG write fails with ENOSPC: one line naming it, no temp or partial file; after the disk
    is 'freed', a re-run resumes and every mask equals the uninterrupted run's."""
    reference = _digests(tiny_run / "crf")
    shutil.rmtree(run_copy / "crf")
    real_save = Image.Image.save
    calls = {"n": 0}

    def failing_save(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            Path(fp).write_bytes(b"\x89PNG half")  # the bytes that made it before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    code, out, err = run_cli("crf", *_args(run_copy))
    assert code == 1
    line = _one_line(err)
    assert "No space left on device" in line and ".png" in line, line
    assert not _temp_files(run_copy)
    assert len(list((run_copy / "crf").glob("*.png"))) == 3
    monkeypatch.setattr(Image.Image, "save", real_save)
    code, out, err = run_cli("crf", *_args(run_copy))
    assert code == 0, err
    assert _digests(run_copy / "crf") == reference


def test_disk_full_while_saving_a_checkpoint(run_copy, run_cli, monkeypatch):
    def failing_save(obj, f, *a, **k):
        Path(f).write_bytes(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    code, out, err = run_cli("train-cls", *_args(run_copy), "--force")
    assert code == 1
    line = _one_line(err)
    assert "checkpoint.pt" in line and "file write failed" in line, line
    assert not _temp_files(run_copy)
    assert not (run_copy / "cls" / "checkpoint.pt").exists()


@pytest.mark.parametrize("override,needle", [
    ("crf.fg_treshold=0.3", "unknown config key 'crf.fg_treshold'"),
    ("train_cls.epochs=ten", "config key 'train_cls.epochs'"),
    ("crf.fg_threshold=1.5", "config key 'crf.fg_threshold': Input should be less than or equal to 1"),
    ("cam.scales=[]", "config key 'cam.scales'"),
])
def test_config_faults_exit_2_naming_the_key(run_cli, tmp_path, override, needle):
    code, out, err = run_cli("run", *_args(tmp_path / "run", override))
    assert code == 2
    assert needle in _one_line(err)
    assert not (tmp_path / "run").exists()


def test_missing_labels(run_cli, tmp_path):
    from tests.conftest import make_voc

    root = make_voc(tmp_path / "voc", {"a": ("cat", (20, 20)), "b": ("dog", (20, 20))})
    (root / "labels.csv").write_text("image,labels\na,cat\n")
    code, out, err = run_cli("data", "check", root)
    assert code == 1 and "labels.csv" in _one_line(err) and "no row for image 'b'" in err
    (root / "labels.csv").unlink()
    code, out, err = run_cli("data", "check", root)
    assert code == 1 and "no image-level labels" in _one_line(err)


def test_split_id_cannot_escape_the_dataset(run_cli, tmp_path):
    from tests.conftest import make_voc

    root = make_voc(tmp_path / "voc", {"a": ("cat", (20, 20))})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n../../../etc/passwd\n")
    code, out, err = run_cli("data", "check", root)
    assert code == 1 and "etc/passwd" in _one_line(err)


def test_same_seed_twice_gives_identical_masks_and_metrics(tiny_run, tmp_path):
    """Determinism on CPU: an independent second run equals the first byte for byte."""
    from wsss.cli import main

    second = tmp_path / "run"
    assert main(["run", *_args(second)]) == 0
    assert _digests(second / "crf") == _digests(tiny_run / "crf") != {}
    assert _digests(second / "predict" / "val") == _digests(tiny_run / "predict" / "val") != {}
    assert _digests(second / "cam", "*.npz") == _digests(tiny_run / "cam", "*.npz")
    a, b = (json.loads((r / "eval" / "summary.json").read_text()) for r in (tiny_run, second))
    assert a == b


def test_rerun_after_a_kill_in_eval_or_report_leaves_no_temp_file(run_copy):
    """A run killed while eval wrote its reports (or while the run report was written) left temp files
    that no stage's output-folder cleanup reached (a slow kill-test failure): the re-run removes them."""
    import subprocess
    import sys

    from wsss.cli import main

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    (run_copy / "eval" / "manifest.json").unlink()
    planted = [run_copy / "eval" / f".summary.json.pid{dead}.a.tmp", run_copy / "crf" / "eval" / f".summary.json.pid{dead}.b.tmp",
               run_copy / "cam" / "eval" / f".sweep.csv.pid{dead}.c.tmp",
               run_copy / "predict" / "val" / "eval" / f".confusion.csv.pid{dead}.d.tmp", run_copy / f".report.html.pid{dead}.e.tmp"]
    for f in planted:
        f.write_text("partial")
    assert main(["run", *_args(run_copy)]) == 0
    assert (run_copy / "eval" / "manifest.json").is_file()
    assert _temp_files(run_copy) == []


def test_output_folder_is_cleared_when_its_marker_or_manifest_names_another_key(tmp_path):
    """prepare_output_folder keeps a folder's outputs only for the same key: the ``.key`` marker decides,
    and a folder without one (written before markers existed) is judged by its manifest."""
    from wsss.manifest import prepare_output_folder

    def fill(folder: Path, manifest_key: str | None, marker: str | None) -> Path:
        folder.mkdir()
        (folder / "checkpoint.pt").write_text("x")
        if manifest_key:
            (folder / "manifest.json").write_text(json.dumps({"key": manifest_key}))
        if marker:
            (folder / ".key").write_text(marker + "\n")
        return folder

    cases = {"same-marker": (None, "k1", True), "other-marker": ("k1", "k0", False), "legacy-same": ("k1", None, True),
             "legacy-other": ("k0", None, False), "empty": (None, None, True)}
    for name, (man, marker, kept) in cases.items():
        folder = fill(tmp_path / name, man, marker)
        prepare_output_folder(folder, "k1", False)
        assert (folder / "checkpoint.pt").exists() == kept, name
        assert (folder / ".key").read_text().strip() == "k1"
    forced = fill(tmp_path / "forced", None, "k1")
    prepare_output_folder(forced, "k1", True)
    assert not (forced / "checkpoint.pt").exists()


def test_temp_files_of_live_writers_are_spared(tmp_path):
    """Two torchrun ranks prepare the same folder: one's cleanup must not delete the temp file the other is
    writing (the cause of a CI failure), while a killed writer's leftovers still go."""
    import subprocess
    import sys

    from wsss.io import atomic_path, remove_temp_files

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".config.yaml.pid{other.pid}.abc.tmp.yaml"
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = tmp_path / f".config.yaml.pid{int(dead.stdout)}.xyz.tmp.yaml"
        old = tmp_path / ".x.npz.k2j3.tmp.npz"  # made before writers named themselves
        for f in (live, gone, old):
            f.write_text("partial")
        with atomic_path(tmp_path / "config.yaml") as mine:
            mine.write_text("being written")
            assert remove_temp_files(tmp_path) == 2
            assert mine.exists() and live.exists() and not gone.exists() and not old.exists()
        assert (tmp_path / "config.yaml").read_text() == "being written"
    finally:
        other.kill()
        other.wait()
    assert remove_temp_files(tmp_path) == 1 and not live.exists()


def test_half_written_files_never_look_like_outputs(tmp_path):
    """A killed stage's temp file must not match the ``*.png``/``*.npz`` listings readers use (a CI failure:
    a crf test read a half PNG named ``.k0.png.pid….tmp.png``)."""
    from wsss.camfile import save_cam
    from wsss.io import atomic_path, read_mask, write_palette_png

    for name in ("a.png", "a.npz", "a.json"):
        with atomic_path(tmp_path / name) as tmp:
            tmp.write_bytes(b"partial")
            listed = {p.name for p in tmp_path.glob("*" + Path(name).suffix)}
            assert tmp.name not in listed and tmp.name.endswith(".tmp")
    mask = np.zeros((3, 4), np.uint8)
    write_palette_png(tmp_path / "m.png", mask)
    assert (read_mask(tmp_path / "m.png") == mask).all()
    save_cam(tmp_path / "c.npz", np.array([2]), np.full((1, 3, 4), 0.5, np.float32))
    classes, cam = load_cam(tmp_path / "c.npz")
    assert classes.tolist() == [2] and cam.shape == (1, 3, 4) and np.allclose(cam, 0.5, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.npz", "a.png", "c.npz", "m.png"]


def test_force_reruns_a_stage_and_everything_after_it(run_copy, run_cli):
    """`--force crf` recomputes crf and every later stage (same outputs: same seed), leaving earlier stages
    alone; `--from/--to` run only their slice."""

    def statuses(out: str) -> dict[str, str]:
        return dict(re.findall(r"^\s+(\S+)\s+(done|up to date)\s", out, re.M))

    masks = _digests(run_copy / "crf")
    cam_mtime = _first_cam(run_copy).stat().st_mtime_ns
    code, out, err = run_cli("run", *_args(run_copy, "--force", "crf"))
    assert code == 0, err
    s = statuses(out)
    assert s["data"] == s["train-cls"] == s["cam"] == "up to date", s
    assert s["crf"] == s["train-seg"] == s["predict"] == "done", s
    assert _first_cam(run_copy).stat().st_mtime_ns == cam_mtime and _digests(run_copy / "crf") == masks
    code, out, err = run_cli("run", *_args(run_copy, "--from", "crf", "--to", "crf", "--force", "crf"))
    assert code == 0, err
    assert set(statuses(out)) == {"crf"} and statuses(out)["crf"] == "done"


def test_killed_training_is_not_resumed_on_changed_inputs(run_copy, run_cli):
    """A training killed after its checkpoint (no manifest yet) resumes when nothing changed, but when its
    inputs change (here: new pseudo-masks from other CRF thresholds) the stale checkpoint is discarded and
    training starts again on the new masks."""
    seg = run_copy / "seg"

    def kill_after_checkpoint() -> None:
        for name in ("manifest.json", "segmenter.pt"):
            (seg / name).unlink()
        assert (seg / "checkpoint.pt").is_file()

    kill_after_checkpoint()
    code, out, err = run_cli("train-seg", *_args(run_copy))
    assert code == 0 and "resumed from" in out + err, out + err  # same inputs: the checkpoint is continued
    kill_after_checkpoint()
    code, out, err = run_cli("run", *_args(run_copy, "crf.fg_threshold=0.5", "crf.low_threshold=0.3"))
    assert code == 0, err
    assert "resumed from" not in out + err, out + err
    man = json.loads((seg / "manifest.json").read_text())
    assert man["inputs"]["crf"] == json.loads((run_copy / "crf" / "manifest.json").read_text())["key"]
