"""Bad input never crashes deep inside: one line naming the file and the problem, exit code != 0
for fatal problems, a reported skip where skipping is the policy, and no partial outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, make_voc
from wsss.data.dataset import load_csv, load_voc
from wsss.errors import DataError, ImageReadError
from wsss.io import read_image, write_palette_png


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("wsss: error:")]
    assert lines, f"no error line in {err!r}"
    assert "Traceback" not in err
    return lines[0]


def test_missing_folder(run_cli, tmp_path):
    code, out, err = run_cli("data", "check", tmp_path / "nope")
    assert code == 1
    line = _one_error_line(err)
    assert "nope" in line and "not found" in line


def test_missing_folder_real_console_script(tmp_path):
    """The installed entry point prints one line, no traceback."""
    p = subprocess.run([sys.executable, "-m", "wsss", "data", "check", str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "dataset folder not found" in p.stderr


def test_truncated_jpeg(run_cli, voc):
    path = voc / "JPEGImages" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, out, err = run_cli("data", "check", voc)
    assert code == 1
    line = _one_error_line(err)
    assert "b.jpg" in line and "truncated" in line


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"this is not an image", "not a readable image")])
def test_zero_byte_and_garbage_images(tmp_path, content, needle):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=needle) as e:
        read_image(p)
    assert "x.jpg" in str(e.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK", "1"])
def test_odd_modes_are_converted(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16))
        assert img.mode.startswith("I;16")
    elif mode == "P":
        img = base.convert("P")
    else:
        img = base.convert(mode)
    p = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(p)
    arr = read_image(p)
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


def test_16bit_png_scaled_not_clipped(tmp_path):
    v = np.full((4, 4), 65535, np.uint16)
    v[0, 0] = 0
    Image.fromarray(v).save(tmp_path / "x.png")
    arr = read_image(tmp_path / "x.png")
    assert arr[1, 1, 0] == 255 and arr[0, 0, 0] == 0


def test_rgba_transparent_composited_on_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    Image.fromarray(a, "RGBA").save(tmp_path / "x.png")
    assert (read_image(tmp_path / "x.png") == 255).all()


def test_exif_rotated_photo(run_cli, voc):
    """An EXIF orientation 6 photo is displayed rotated: its mask must match the rotated size."""
    arr = np.zeros((30, 50, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    (voc / "JPEGImages" / "a.jpg").write_bytes(jpeg_bytes(arr, exif_orientation=6))
    img = read_image(voc / "JPEGImages" / "a.jpg")
    assert img.shape == (50, 30, 3)
    assert img[:10].mean() > 200  # rotated 90 degrees clockwise: the band is now on top
    write_palette_png(voc / "SegmentationClass" / "a.png", np.zeros((50, 30), np.uint8))
    code, out, err = run_cli("data", "check", voc)
    assert code == 0, err
    write_palette_png(voc / "SegmentationClass" / "a.png", np.zeros((30, 50), np.uint8))
    code, out, err = run_cli("data", "check", voc)
    assert code == 1 and "a.png" in _one_error_line(err) and "differs" in err


def test_image_with_no_labels_is_a_reported_skip(run_cli, tmp_path, caplog):
    root = make_voc(tmp_path / "v", {"a": ("cat", (20, 20)), "b": ("", (20, 20))})
    ds = load_voc(root, "train")
    assert [s.id for s in ds] == ["a"] and ds.skipped == ["b"]
    code, out, err = run_cli("data", "check", root)
    assert code == 0
    assert "1 skipped" in out


def test_unknown_class_name(run_cli, tmp_path):
    root = make_voc(tmp_path / "v", {"a": ("cat", (20, 20)), "b": ("zebra", (20, 20))})
    code, out, err = run_cli("data", "check", root)
    assert code == 1
    line = _one_error_line(err)
    assert "labels.csv" in line and "line 3" in line and "unknown class 'zebra'" in line


def test_mask_size_differs(run_cli, voc):
    write_palette_png(voc / "SegmentationClass" / "c.png", np.zeros((10, 10), np.uint8))
    code, out, err = run_cli("data", "check", voc)
    assert code == 1
    line = _one_error_line(err)
    assert "c.png" in line and "10x10" in line and "48x64" in line


def test_mask_ids_out_of_range(run_cli, voc):
    m = np.zeros((64, 48), np.uint8)
    m[0, 0] = 7
    write_palette_png(voc / "SegmentationClass" / "c.png", m)
    code, out, err = run_cli("data", "check", voc)
    assert code == 1 and "outside the class range" in _one_error_line(err)


def test_duplicate_ids_in_labels_csv(run_cli, voc):
    with open(voc / "labels.csv", "a") as f:
        f.write("a,dog\n")
    code, out, err = run_cli("data", "check", voc)
    assert code == 1
    line = _one_error_line(err)
    assert "labels.csv" in line and "duplicate image id 'a'" in line


def test_duplicate_ids_in_split_file(run_cli, voc):
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\na\n")
    code, out, err = run_cli("data", "check", voc)
    assert code == 1 and "duplicate image id 'a'" in _one_error_line(err) and "train.txt" in err


def test_empty_split_file(run_cli, voc):
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n\n")
    code, out, err = run_cli("data", "check", voc)
    assert code == 1
    line = _one_error_line(err)
    assert "train.txt" in line and "empty" in line


def test_split_lists_image_without_file(voc):
    (voc / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match="image 'b' listed in train.txt has no file"):
        load_voc(voc, "train")


def test_missing_split_lists_available(voc):
    with pytest.raises(DataError, match=r"available splits: train"):
        load_voc(voc, "val")


def test_csv_manifest_paths_cannot_escape(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "classes.txt").write_text("background\ncat\n")
    (root / "m.csv").write_text("image,labels\n../../etc/passwd,cat\n")
    with pytest.raises(DataError, match="escapes the dataset folder"):
        load_csv(root / "m.csv")
    (root / "m.csv").write_text("image,labels\n/etc/passwd,cat\n")
    with pytest.raises(DataError, match="must be relative"):
        load_csv(root / "m.csv")


def test_csv_manifest_loads(tmp_path):
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "img" / "x.png")
    write_palette_png(root / "img" / "x_mask.png", np.ones((8, 8), np.uint8))
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "m.csv").write_text("image,labels,mask\nimg/x.png,dog cat,img/x_mask.png\n")
    ds = load_csv(root / "m.csv")
    assert ds.samples[0].labels == (1, 2) and ds.has_masks and ds.label_vector(0).tolist() == [1.0, 1.0]


def test_labels_from_voc_xml_annotations(tmp_path):
    root = make_voc(tmp_path / "v", {"a": ("cat", (20, 20))}, classes=("cat", "dog"))
    (root / "labels.csv").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><object><name>dog</name></object><object><name>cat</name></object></annotation>")
    assert load_voc(root, "train").samples[0].labels == (1, 2)


def test_synth_failure_leaves_no_partial_output(tmp_path, monkeypatch):
    from wsss.config import SynthConfig
    from wsss.data import synth

    calls = {"n": 0}
    real = synth.render_sample

    def flaky(cfg, i):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(cfg, i)

    monkeypatch.setattr(synth, "render_sample", flaky)
    with pytest.raises(OSError):
        synth.generate(SynthConfig(n_train=6, n_val=2, size=64), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temp folder survive


def test_check_report_json_written_atomically(run_cli, voc, tmp_path):
    code, out, err = run_cli("data", "check", voc, "--json", tmp_path / "r.json")
    assert code == 0
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["train"]["images"] == 3 and rep["train"]["ok"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
