"""`wsss inspect`: the HTML gallery (rendered in real headless Chromium), mask statistics, report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.camfile import save_cam
from wsss.data.dataset import load_voc
from wsss.pipeline.gallery import Card, heatmap, image_miou, mask_overlay, mask_statistics, render_gallery, write_gallery
from wsss.io import write_palette_png

from tests.conftest import make_voc


def _tiny_run(tmp_path: Path, run_cli) -> Path:
    """A run directory with data, CAMs, pseudo-masks and val predictions, made without training."""
    voc = make_voc(tmp_path / "voc", {"a": ("cat", (40, 50)), "b": ("dog cat", (30, 30)), "c": ("dog", (64, 48))})
    run = tmp_path / "run"
    code, _, err = run_cli("run", "configs/demo.yaml", "--to", "data", "data.source=voc", f"data.root={voc}",
                           "data.val_split=train", f"run.out_dir={run}")
    assert code == 0, err
    ds = load_voc(voc, "train")
    rng = np.random.default_rng(0)
    for i, s in enumerate(ds):
        h, w = ds.read_mask(i).shape
        save_cam(run / "cam" / f"{s.id}.npz", np.array(s.labels), rng.random((len(s.labels), h, w)))
        mask = ds.read_mask(i).copy()
        mask[:3] = 255
        write_palette_png(run / "crf" / f"{s.id}.png", mask)
    (run / "cam" / "manifest.json").write_text('{"config": {"split": "train"}, "key": "x"}')
    write_palette_png(run / "crf" / "c.png", np.full((64, 48), 1, np.uint8))  # "c" is a dog: disagrees
    return run


def test_heatmap_and_overlay_keep_inputs():
    img = np.full((4, 5, 3), 80, np.uint8)
    cam = np.linspace(0, 2, 20, dtype=np.float32).reshape(4, 5)
    before = img.copy(), cam.copy()
    assert heatmap(img, cam).shape == (4, 5, 3)
    assert mask_overlay(img, np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert np.array_equal(img, before[0]) and np.array_equal(cam, before[1])
    assert heatmap(img, np.zeros((4, 5), np.float32)).dtype == np.uint8  # an all-zero map does not divide by 0


def test_image_miou_counts_present_classes_only():
    gt = np.array([[0, 0, 1, 1]], np.uint8)
    assert image_miou(gt, gt, 5) == 100.0
    assert image_miou(gt, np.array([[0, 0, 1, 2]], np.uint8), 5) == pytest.approx(100 * (1 + 0.5 + 0) / 3, abs=0.1)
    assert image_miou(gt, np.array([[0, 0, 1, 255]], np.uint8), 5) == 100.0  # 255 pixels do not count


def test_gallery_escapes_names():
    card = Card("<img src=x onerror=alert(1)>", ["<b>"], [("photo", "img/a'b.jpg")], {"pseudo": 50.0})
    page = render_gallery([card], ["background", "<script>alert(1)</script>"], "t <i>")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "<img src=x" not in page and "a&#x27;b.jpg" in page and "t &lt;i&gt;" in page


def test_mask_statistics_finds_disagreements(tmp_path, run_cli):
    run = _tiny_run(tmp_path, run_cli)
    st = mask_statistics(load_voc(tmp_path / "voc", "train"), run / "crf")
    assert st["images"] == 3 and st["ignore_share"] > 0
    # b is labelled "dog cat" but its mask only has the dog; c was overwritten with cat pixels
    assert st["disagree"] == [{"id": "b", "missing": ["cat"], "unlabelled": []},
                              {"id": "c", "missing": ["dog"], "unlabelled": ["cat"]}]
    code, out, err = run_cli("inspect", run, "--stats")
    assert code == 0, err
    assert "c: labelled but absent: dog; present but not labelled: cat" in out and "2 disagree" in out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_gallery_renders_in_headless_chromium(tmp_path, run_cli):
    browser = _chromium()
    if browser is None:
        if os.environ.get("WSSS_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (WSSS_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium not installed (CI installs it: see .ci/run)")
    run = _tiny_run(tmp_path, run_cli)
    code, out, err = run_cli("inspect", run)
    assert code == 0, err
    page = run / "inspect" / "train" / "index.html"
    assert page.is_file() and len(list((run / "inspect" / "train" / "img").glob("*.jpg"))) >= 9
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--window-size=1000,800"]
    shot = tmp_path / "shot.png"
    p = subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), p.stderr[-2000:]
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "screenshot looks blank"
    # the page's script ran (it counts the cards and marks the body)
    p = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-ready="yes"' in p.stdout and "3 of 3 images" in p.stdout, p.stderr[-2000:]
    assert not [line for line in p.stderr.splitlines() if ":CONSOLE" in line]


def test_run_writes_report(tmp_path, run_cli):
    from wsss.pipeline.report import render_html, write_report

    run = _tiny_run(tmp_path, run_cli)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text('{"crf": {"mIoU": 61.5, "kept_share": 80.0, "mIoU_ignored_as_bg": 55.3, '
                                              '"per_class_iou": {"background": 90.0, "cat": 50.0, "dog": 44.5}}}')
    rep = write_report(run)
    assert [s["stage"] for s in rep["stages"]] == ["data", "cam"]
    page = (run / "report.html").read_text()
    assert ("pseudo-masks mIoU 61.5 on kept pixels, 80.0% kept; 55.3 with ignored pixels as background" in page
            and "data:image/png;base64," in page)
    assert "&lt;x&gt;" in render_html(rep | {"run": "<x>"})
    assert "Recall by object size" not in page  # a summary without the error breakdown draws no such figure
    summary = json.loads((run / "eval" / "summary.json").read_text())
    summary["crf"]["errors"] = {"recall_by_size": {"<=10%": 80.0, "10-20%": None, ">50%": 60.0}}
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    write_report(run)
    assert "Recall by object size" in (run / "report.html").read_text()


def test_report_leaves_out_a_disabled_stage(tmp_path, run_cli):
    """An expand/ folder from an earlier `wsss expand` is not reported when the run switched expand off."""
    import shutil

    import yaml

    from wsss.pipeline.report import write_report

    run = _tiny_run(tmp_path, run_cli)
    shutil.copytree(run / "cam", run / "expand")
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text('{"expand": {"mIoU": 50.0, "best_threshold": 0.3, "fg_precision": 60.0, "fg_recall": 55.0}, "crf": {"mIoU": 61.5, "kept_share": 80.0}}')
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for enabled, stages in ((False, ["data", "cam"]), (True, ["data", "cam", "expand"])):
        cfg["expand"]["enabled"] = enabled
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        rep = write_report(run)
        assert [s["stage"] for s in rep["stages"]] == stages and ("expand" in rep["metrics"]) == enabled
