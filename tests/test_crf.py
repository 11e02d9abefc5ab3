"""Stage 4: dense-CRF pseudo-masks (core on tiny synthetic arrays, then the stage, eval and sweep)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from wsss.camfile import load_cam, save_cam
from wsss.config import CrfConfig, load_config
from wsss.crf import dense_crf, dense_crf_many, mask_stats, pseudo_mask, refine
from wsss.errors import DataError, WsssError
from wsss.io import read_mask, voc_palette, write_image, write_palette_png
from wsss.manifest import write_manifest
from wsss.crf.pool import crf_one
from wsss.crf.sweep import SCORE_COLUMN, choose_best
from wsss.evaluation.masks import SIZE_BINS, SIZE_LABELS, evaluate_masks, size_counts
from wsss.pipeline.runner import open_split, run_stage
from wsss.stages.crf import sweep as sweep_crf

from tests.conftest import make_voc


def two_colour_scene(h=40, w=60, edge=30):
    """Left of ``edge`` red, right blue (plus mild noise); a CAM for class 3 that spills 8 px past the
    colour edge and fades out gradually."""
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edge] = (200, 30, 30)
    img[:, edge:] = (30, 30, 200)
    img = np.clip(img.astype(int) + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)
    x = np.arange(w)
    cam = np.clip((edge + 8 - x) / 16.0 + 0.5, 0, 1)[None, None, :].repeat(h, 1).astype(np.float32)
    return img, np.array([3]), cam


PROB = CrfConfig(mode="probability", bg_threshold=0.4)


def test_mask_snaps_to_colour_edge():
    img, classes, cam = two_colour_scene()
    naive = np.where(cam[0] > 0.4, 3, 0)
    mask = pseudo_mask(img, classes, cam, PROB)
    truth = np.zeros(mask.shape, np.uint8)
    truth[:, :30] = 3
    naive_err = (naive != truth).mean()
    crf_err = (mask != truth).mean()
    assert naive_err > 0.1, "the test scene must be wrong without the CRF"
    assert crf_err < 0.02 and crf_err < naive_err / 5


def test_absent_classes_never_appear_and_input_untouched():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    cams = rng.random((2, 24, 32)).astype(np.float32)
    classes = np.array([2, 5])
    img0, cams0 = img.copy(), cams.copy()
    for cfg in (PROB, CrfConfig(), CrfConfig(mode="probability", bg_score="power", alpha=2.0), CrfConfig(unary="labels")):
        m = pseudo_mask(img, classes, cams, cfg)
        assert m.dtype == np.uint8 and m.shape == (24, 32)
        assert set(np.unique(m)) <= {0, 2, 5, 255}
        if cfg.mode == "probability":
            assert 255 not in m
    assert np.array_equal(img, img0) and np.array_equal(cams, cams0)
    assert np.array_equal(pseudo_mask(img, np.array([], np.int64), np.zeros((0, 24, 32), np.float32), PROB), np.zeros((24, 32)))


def test_ignore_exactly_where_confident_passes_disagree():
    img, classes, cam = two_colour_scene()
    cfg = CrfConfig(mode="confidence", fg_threshold=0.9, low_threshold=0.05)
    m = pseudo_mask(img, classes, cam, cfg)
    hi = refine(img, cam, cfg.fg_threshold, cfg)
    lo = refine(img, cam, cfg.low_threshold, cfg)
    assert ((m == 255) == (hi != lo)).all()
    assert (m == 255).any() and (m == 3).any() and (m == 0).any()
    assert np.array_equal(m, pseudo_mask(img, classes, cam, cfg)), "deterministic"


def test_shared_pairwise_kernels_give_the_same_posteriors_as_separate_crfs():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)
    unaries = [rng.random((3, 20, 28)).astype(np.float32) * 4 for _ in range(3)]
    copies = [u.copy() for u in unaries]
    cfg = CrfConfig(iterations=4)
    shared = dense_crf_many(img, unaries, cfg)
    for u, post in zip(unaries, shared):
        assert np.allclose(post, dense_crf(img, u, cfg), atol=1e-6)
    assert not np.allclose(shared[0], shared[1]), "each unary gets its own inference"
    assert all(np.array_equal(u, c) for u, c in zip(unaries, copies))
    with pytest.raises(ValueError, match="all unaries"):
        dense_crf_many(img, [unaries[0], unaries[1][:2]], cfg)


@pytest.mark.parametrize("bad,msg", [
    (lambda c: c[:, :-1], "cams are"),
    (lambda c: np.where(c > 0.5, np.nan, c), "NaN"),
    (lambda c: c[None], "must be"),
])
def test_core_rejects_bad_cams(bad, msg):
    img, classes, cam = two_colour_scene()
    with pytest.raises(ValueError, match=msg):
        pseudo_mask(img, classes, bad(cam), PROB)


def test_mask_stats():
    m = np.zeros((10, 10), np.uint8)
    m[:5] = 2
    m[5:7] = 255
    assert mask_stats(m) == {"classes": [2], "fg_share": 0.5, "ignore_share": 0.2}


# --------------------------------------------------------------------------------------------------
# the stage


def _run_with_cams(tmp_path, n=4):
    """A run directory over a tiny VOC set whose CAMs are made from the ground-truth boxes (so the
    expected masks are known), with a finished cam manifest."""
    items = {f"i{k}": ("cat" if k % 2 else "dog", (36, 44)) for k in range(n)}
    root = make_voc(tmp_path / "voc", items)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("i0\n")
    for sid in items:  # images with a clear colour edge around the box, so the CRF has something to follow
        gt = read_mask(root / "SegmentationClass" / f"{sid}.png")
        img = np.full((*gt.shape, 3), 40, np.uint8)
        img[gt > 0] = (220, 200, 40)
        write_image(root / "JPEGImages" / f"{sid}.jpg", img, quality=98)
    cfg = load_config(None, [f"data.source=voc", f"data.root={root}", f"run.out_dir={tmp_path / 'run'}"])
    run_dir = tmp_path / "run"
    run_stage("data", cfg, run_dir)
    ds = open_split(run_dir, "train")
    for i, s in enumerate(ds):
        gt = ds.read_mask(i)
        cam = (gt == s.labels[0]).astype(np.float32)
        cam = (cam * 0.9)[None]
        save_cam(run_dir / "cam" / f"{s.id}.npz", np.array(s.labels), cam)
    write_manifest(run_dir / "cam", "cam", {}, "h", {}, {"images": len(ds)}, 0.0)
    return cfg, run_dir, ds


def test_stage_writes_palette_pngs_stats_and_resumes(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path)
    out = run_stage("crf", cfg, run_dir, workers=1)
    assert not out.skipped and out.manifest["outputs"]["computed"] == len(ds)
    for i, s in enumerate(ds):
        im = Image.open(run_dir / "crf" / f"{s.id}.png")
        assert im.mode == "P" and np.array_equal(np.array(im.getpalette()[:9]), voc_palette()[:3].ravel())
        assert set(np.unique(np.array(im))) <= {0, *s.labels, 255}
    rows = list(csv.DictReader(open(run_dir / "crf" / "stats.csv")))
    assert [r["id"] for r in rows] == [s.id for s in ds] and all(0 < float(r["fg_share"]) < 1 for r in rows)
    res = evaluate_masks(run_dir / "crf", ds)
    assert res["mIoU"] > 90 and res["kept_share"] > 90

    assert run_stage("crf", cfg, run_dir, workers=1).skipped
    # a killed run: one mask missing and a stale temp file; the re-run computes exactly that one
    before = (run_dir / "crf" / "i1.png").read_bytes()
    (run_dir / "crf" / "i1.png").unlink()
    (run_dir / "crf" / "manifest.json").unlink()
    again = run_stage("crf", cfg, run_dir, workers=1)
    assert again.manifest["outputs"]["computed"] == 1 and again.manifest["outputs"]["reused"] == len(ds) - 1
    assert (run_dir / "crf" / "i1.png").read_bytes() == before


def test_two_workers_give_the_same_masks(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path, n=6)
    run_stage("crf", cfg, run_dir, workers=1)
    one = {s.id: read_mask(run_dir / "crf" / f"{s.id}.png") for s in ds}
    two = run_stage("crf", cfg, run_dir, force=True, workers=2)
    assert two.manifest["outputs"]["workers"] == 2
    for s in ds:
        assert np.array_equal(one[s.id], read_mask(run_dir / "crf" / f"{s.id}.png"))


def test_stage_bad_inputs(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path)
    save_cam(run_dir / "cam" / "ghost.npz", np.array([1]), np.zeros((1, 36, 44), np.float32))
    with pytest.raises(DataError, match="no image in split"):
        run_stage("crf", cfg, run_dir, workers=1)
    (run_dir / "cam" / "ghost.npz").unlink()
    (run_dir / "cam" / "i0.npz").unlink()
    with pytest.raises(DataError, match="no CAM file"):
        run_stage("crf", cfg, run_dir, workers=1)
    job = ("i1", str(ds[1].image), str(run_dir / "cam" / "i1.npz"), str(tmp_path / "x.png"))
    np.savez(run_dir / "cam" / "i1.npz", classes=np.array([1], np.int16), cam=np.full((1, 36, 44), np.nan, np.float16))
    with pytest.raises(DataError, match="NaN"):
        crf_one(job, CrfConfig(), 2)
    save_cam(run_dir / "cam" / "i1.npz", np.array([1]), np.zeros((1, 20, 20), np.float32))
    with pytest.raises(DataError, match="differs from its image"):
        crf_one(job, CrfConfig(), 2)
    assert not (tmp_path / "x.png").exists()


def test_worker_error_is_reported(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path)
    save_cam(run_dir / "cam" / "i2.npz", np.array([1]), np.zeros((1, 20, 20), np.float32))
    with pytest.raises(DataError, match="differs from its image"):
        run_stage("crf", cfg, run_dir, workers=2)


def test_eval_masks_counts_kept_pixels(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path, n=2)
    folder = tmp_path / "pred"
    for i, s in enumerate(ds):
        gt = ds.read_mask(i)
        pred = gt.copy()
        pred[:, : gt.shape[1] // 2] = 255  # half the image ignored
        write_palette_png(folder / f"{s.id}.png", pred)
    res = evaluate_masks(folder, ds)
    assert res["mIoU"] == 100.0 and res["kept_share"] == 50.0
    wrong = ds.read_mask(0)
    write_palette_png(folder / f"{ds[0].id}.png", np.where(wrong > 0, 0, wrong).astype(np.uint8))
    assert evaluate_masks(folder, ds)["mIoU"] < 100
    (folder / f"{ds[1].id}.png").unlink()
    with pytest.raises(DataError, match="no mask"):
        evaluate_masks(folder, ds)


def test_sweep_writes_loadable_snippet(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path)
    cfg = load_config(None, [f"data.source=voc", f"data.root={tmp_path / 'voc'}", f"run.out_dir={run_dir}",
                             "crf.sweep={fg_threshold: [0.3, 0.6], low_threshold: [0.05]}", "crf.sweep_images=3"])
    res = sweep_crf(cfg, run_dir, workers=1)
    assert len(res["rows"]) == 2 and res["images"] == 3
    text = (run_dir / "crf_sweep" / "best.yaml").read_text()
    snippet = yaml.safe_load(text)
    assert set(snippet["crf"]) == {"fg_threshold", "low_threshold"}
    assert load_config(None, [f"crf.{k}={v}" for k, v in snippet["crf"].items()]).crf.fg_threshold == res["best"]["fg_threshold"]
    assert not list((run_dir / "crf_sweep").glob("trial_*")), "trial folders are cleaned up"


def test_choose_best_by_every_pixel_score_prefers_keeping_pixels():
    rows = [{"fg_threshold": 0.4, "mIoU": 70.0, "kept_share": 86.0, "mIoU_ignored_as_bg": 60.0},
            {"fg_threshold": 0.3, "mIoU": 66.0, "kept_share": 95.0, "mIoU_ignored_as_bg": 64.0},
            {"fg_threshold": 0.5, "mIoU": 75.0, "kept_share": 70.0, "mIoU_ignored_as_bg": 50.0}]
    assert choose_best(rows, SCORE_COLUMN["kept_pixels"], 0.85) == (rows[0], True)
    assert choose_best(rows, SCORE_COLUMN["every_pixel"], 0.85) == (rows[1], True)
    assert choose_best(rows, SCORE_COLUMN["kept_pixels"], 0.99) == (rows[1], False)  # none keeps enough: the one keeping most
    tied = [{"low_threshold": 0.1, "mIoU": 66.0, "kept_share": 88.0, "mIoU_ignored_as_bg": 64.05},
            {"low_threshold": 0.2, "mIoU": 67.0, "kept_share": 86.0, "mIoU_ignored_as_bg": 64.0},
            {"low_threshold": 0.3, "mIoU": 68.0, "kept_share": 85.5, "mIoU_ignored_as_bg": 63.9}]
    assert choose_best(tied, SCORE_COLUMN["every_pixel"], 0.85)[0] is tied[1], "within 0.1: the better kept-pixel mIoU"


def test_sweep_on_the_affinity_maps_writes_an_affinity_snippet_and_skips_invalid_pairs(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path)
    for s in ds:  # walked maps: the CAMs, softened, as the affinity stage would leave them
        classes, cam = load_cam(run_dir / "cam" / f"{s.id}.npz")
        save_cam(run_dir / "affinity" / "maps" / f"{s.id}.npz", classes, 0.7 * cam.astype(np.float32))
    cfg = load_config(None, [f"data.source=voc", f"data.root={tmp_path / 'voc'}", f"run.out_dir={run_dir}",
                             "crf.sweep={fg_threshold: [0.3, 0.6], low_threshold: [0.2, 0.4]}", "crf.sweep_images=3",
                             "crf.sweep_score=every_pixel"])
    with pytest.raises(WsssError, match="no finished affinity stage"):
        sweep_crf(cfg, run_dir, workers=1, maps="affinity")
    write_manifest(run_dir / "affinity", "affinity", {}, "h", {}, {"images": len(ds)}, 0.0)
    res = sweep_crf(cfg, run_dir, workers=1, maps="affinity")
    assert res["skipped"] == [{"fg_threshold": 0.3, "low_threshold": 0.4}], "low above fg is not a setting"
    assert len(res["rows"]) == 3 and res["score"] == "mIoU_ignored_as_bg"
    assert res["best"] == choose_best(res["rows"], "mIoU_ignored_as_bg", cfg.crf.sweep_min_kept)[0]
    out = run_dir / "crf_sweep_affinity"
    snippet = yaml.safe_load((out / "best.yaml").read_text())
    assert snippet == {"affinity": {"fg_threshold": res["best"]["fg_threshold"], "low_threshold": res["best"]["low_threshold"]}}
    loaded = load_config(None, [f"affinity.{k}={v}" for k, v in snippet["affinity"].items()])
    assert loaded.affinity.fg_threshold == res["best"]["fg_threshold"]
    header = (out / "sweep.csv").read_text().splitlines()[0]
    assert header == "fg_threshold,low_threshold,mIoU,kept_share,mIoU_ignored_as_bg"
    assert not (run_dir / "crf_sweep").exists(), "the crf stage's sweep folder is left alone"


def test_config_rejects_bad_crf_settings():
    from wsss.errors import ConfigError

    with pytest.raises(ConfigError, match="low_threshold"):
        load_config(None, ["crf.fg_threshold=0.1", "crf.low_threshold=0.3"])
    with pytest.raises(ConfigError, match="sweep keys"):
        load_config(None, ["crf.sweep={nope: [1]}"])


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_run_leaves_no_half_file_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    # enough images that the run is still going when it is killed
    items = {f"k{k}": ("cat", (240, 320)) for k in range(16)}
    root = make_voc(tmp_path / "big", items)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("k0\n")
    conf = tmp_path / "c.yaml"
    conf.write_text(f"run: {{out_dir: {tmp_path / 'bigrun'}}}\ndata: {{source: voc, root: {root}}}\n")
    big = load_config(conf)
    run_stage("data", big, tmp_path / "bigrun")
    bds = open_split(tmp_path / "bigrun", "train")
    rng = np.random.default_rng(0)
    for s in bds:
        save_cam(tmp_path / "bigrun" / "cam" / f"{s.id}.npz", np.array(s.labels), rng.random((1, 240, 320)).astype(np.float32))
    write_manifest(tmp_path / "bigrun" / "cam", "cam", {}, "h", {}, {}, 0.0)
    proc = subprocess.Popen([sys.executable, "-m", "wsss", "-q", "crf", str(conf), "--workers", "2"])
    out = tmp_path / "bigrun" / "crf"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the CRF runs in worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "orphaned CRF workers outlive their killed parent"
    done = sorted(out.glob("*.png"))
    assert 2 <= len(done) < 16, "killed mid-run"
    for p in done:
        assert read_mask(p).shape == (240, 320)  # every visible PNG is complete
    assert not (out / "manifest.json").exists()
    again = run_stage("crf", big, tmp_path / "bigrun", workers=2)
    o = again.manifest["outputs"]
    assert o["reused"] >= len(done) and o["reused"] + o["computed"] == 16
    assert not list(out.glob(".*.tmp*")), "temp files of the killed run are cleaned up"


# --------------------------------------------------------------------------------------------------
# thresholds without ground truth


def test_multi_otsu_cuts_between_the_three_modes():
    from wsss.crf.auto import multi_otsu

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.02, 6000), rng.normal(0.45, 0.05, 1500), rng.normal(0.9, 0.03, 2500)])
    hist = np.bincount(np.clip((values * 256).astype(int), 0, 255), minlength=256)
    h0 = hist.copy()
    t1, t2 = multi_otsu(hist)
    assert 0.11 * 256 <= t1 <= 0.30 * 256 and 0.60 * 256 <= t2 <= 0.81 * 256, (t1, t2)  # between the modes' 3-sigma ranges
    assert np.array_equal(hist, h0)


def test_auto_thresholds_never_open_a_mask_file(tmp_path):
    cfg, run_dir, ds = _run_with_cams(tmp_path, n=6)
    for s in ds:  # any read of the ground truth now fails loudly
        s.mask.write_bytes(b"not a png")
    auto = cfg.model_copy(update={"crf": cfg.crf.model_copy(update={"thresholds": "auto", "auto_images": 4})})
    out = run_stage("crf", auto, run_dir, workers=1)
    chosen = out.manifest["outputs"]["auto_thresholds"]
    assert chosen["images"] == 4 and 0 < chosen["low_threshold"] < chosen["fg_threshold"] < 0.9
    assert len(list((run_dir / "crf").glob("*.png"))) == len(ds)
    again = run_stage("crf", auto, tmp_path / "run", workers=1)
    assert again.skipped  # the same maps give the same thresholds, and so the same key


def test_masks_are_also_scored_with_ignored_pixels_as_background(tmp_path):
    root = make_voc(tmp_path / "v", {"a": ("cat", (40, 40))})
    from wsss.data.dataset import load_voc

    ds = load_voc(root, "train")
    gt = ds.read_mask(0)
    pred = gt.copy()
    pred[gt > 0] = 255  # the object left unlabelled
    write_palette_png(tmp_path / "m" / "a.png", pred)
    res = evaluate_masks(tmp_path / "m", ds)
    assert res["mIoU"] == 100.0 and res["kept_share"] < 100  # perfect on the pixels it keeps
    assert res["mIoU_ignored_as_bg"] < 60  # but the object is lost when ignored pixels count as background
    # no kept pixel is cat, so the kept-pixel IoU has nothing to score; on every pixel the cat is missed
    assert res["per_class_iou"]["cat"] is None and res["per_class_iou_ignored_as_bg"]["cat"] == 0.0
    assert res["per_class_iou_ignored_as_bg"]["background"] < 100


def test_size_counts_split_recall_by_object_size_and_leave_inputs_untouched():
    gt = np.zeros((20, 20), np.uint8)
    gt[:12, :12] = 1  # 36% of the valid pixels: the 35-50% bin
    gt[15:17, 15:17] = 2  # 1%: the <=10% bin
    gt[19, :] = 255
    pred = np.zeros_like(gt)
    pred[:12, :6] = 1  # half the big object
    pred[15:17, 15:17] = 2  # the whole small one
    pred[0, 19] = 255  # an ignored prediction on background changes nothing here
    g0, p0 = gt.copy(), pred.copy()
    found, total, objects = size_counts(gt, pred, 3)
    assert np.array_equal(gt, g0) and np.array_equal(pred, p0)
    assert found.shape == total.shape == objects.shape == (3, len(SIZE_BINS))
    assert found[1, 3] == 72 and total[1, 3] == 144 and objects[1].tolist() == [0, 0, 0, 1, 0]
    assert found[2, 0] == 4 and total[2, 0] == 4 and objects[2].tolist() == [1, 0, 0, 0, 0]
    assert not found[0].any() and not total[0].any()
    pred[:12, 6:] = 255  # the other half ignored: still missed, on every pixel
    assert size_counts(gt, pred, 3)[0][1, 3] == 72


def test_error_breakdown_gives_precision_recall_and_recall_by_size(tmp_path):
    root = make_voc(tmp_path / "v", {"a": ("cat", (40, 40)), "b": ("dog", (40, 40))})
    from wsss.data.dataset import load_voc

    ds = load_voc(root, "train")
    for i, s in enumerate(ds):
        gt = ds.read_mask(i)
        pred = gt.copy()
        if s.id == "a":
            pred[gt > 0] = 255  # the cat ignored: recall 0, whatever its size
        else:
            pred[(gt == 0) & (np.arange(gt.shape[1]) < 5)] = gt[gt > 0].max()  # a strip of background called dog
        write_palette_png(tmp_path / "m" / f"{s.id}.png", pred)
    err = evaluate_masks(tmp_path / "m", ds)["errors"]
    assert err["recall"]["cat"] == 0.0 and err["precision"]["cat"] is None  # nothing predicted cat
    assert err["recall"]["dog"] == 100.0 and err["precision"]["dog"] < 100
    assert sum(err["objects_by_size"].values()) == 2 and list(err["recall_by_size"]) == list(SIZE_LABELS)
    per = err["recall_by_size_per_class"]
    assert [v for v in per["cat"].values() if v is not None] == [0.0]
    assert [v for v in per["dog"].values() if v is not None] == [100.0]
    assert "background" not in per
