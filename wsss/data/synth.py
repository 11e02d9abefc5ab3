"""Built-in synthetic WSSS dataset, deterministic from a seed, written in VOC layout.

Design (why it is hard in the way real WSSS is hard):

* Every object is a large **body** (a smooth random blob with a random colour, drawn from the same
  distribution for every class) plus a small **part** (the "head", ``part_frac`` of the object's area)
  filled with a class-specific texture: stripes, checker, dots, rings, grid or zigzag, in random colours
  and orientation. The class is identifiable *only* from the part, so a classifier fires on the part and
  its CAM misses the body, exactly the "dog's head, not its body" failure of real CAMs. The ground-truth
  mask covers body + part.
* Objects of different classes co-occur (1 to ``max_objects`` per image, classes drawn independently)
  and may occlude each other; a label is kept only when its part stays mostly visible.
* Backgrounds are cluttered: a colour gradient, sensor noise, and ``clutter`` distractor shapes with the
  same colour statistics as bodies, so colour alone does not separate objects from background.
* Bodies have uniform colour with sharp edges, so later stages (erasing, CRF) have real signal to
  recover the whole object from the part.

Files written (VOC layout, loadable with :func:`wsss.data.dataset.load_voc`)::

    JPEGImages/<id>.jpg          RGB photos (JPEG quality 95)
    SegmentationClass/<id>.png   palette masks: 0 background, k = class k (no 255)
    SegmentationPart/<id>.png    palette masks of the discriminative parts only (for analysis)
    ImageSets/Segmentation/{train,val}.txt
    classes.txt, labels.csv, synth.json (the generator's parameters)
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from wsss import __version__
from wsss.config import SynthConfig, config_hash, config_to_dict
from wsss.errors import DataError
from wsss.io import read_json, write_image, write_json, write_palette_png, write_text
from wsss.log import progress

log = logging.getLogger(__name__)

PATTERNS = ("stripes", "checker", "dots", "rings", "grid", "zigzag")


def _hsv_colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    h = rng.uniform(0, 180)
    s = rng.uniform(*sat) * 255
    v = rng.uniform(*val) * 255
    px = np.array([[[h, s, v]]], dtype=np.float32)
    return cv2.cvtColor(px.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _part_colours(rng: np.random.Generator, cls: int, n_cls: int) -> tuple[np.ndarray, np.ndarray]:
    """A class's characteristic colour pair (a bright hue on a dark ground), jittered per object."""
    hue = (cls - 1) / n_cls * 180 + rng.uniform(-6, 6)
    bright = np.array([[[hue % 180, rng.uniform(0.75, 1.0) * 255, rng.uniform(0.8, 1.0) * 255]]], np.float32)
    dark = np.array([[[(hue + 90) % 180, rng.uniform(0.3, 0.8) * 255, rng.uniform(0.1, 0.3) * 255]]], np.float32)
    pa = cv2.cvtColor(bright.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    pb = cv2.cvtColor(dark.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    return pa, pb


def _pattern(kind: str, h: int, w: int, cx: float, cy: float, period: float, angle: float) -> np.ndarray:
    """Boolean ``(H, W)`` texture of ``kind`` centred at (cx, cy)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = x * c + y * s, -x * s + y * c
    if kind == "stripes":
        return (np.floor(u / period) % 2) == 0
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    if kind == "dots":
        du = u - (np.floor(u / period) + 0.5) * period
        dv = v - (np.floor(v / period) + 0.5) * period
        return du * du + dv * dv < (0.32 * period) ** 2
    if kind == "rings":
        return (np.floor(np.sqrt(x * x + y * y) / period) % 2) == 0
    if kind == "grid":
        fu, fv = np.mod(u, period * 1.5), np.mod(v, period * 1.5)
        return (fu < period * 0.45) | (fv < period * 0.45)
    if kind == "zigzag":
        tri = np.abs(np.mod(v / period, 2.0) - 1.0) * period
        return (np.floor((u + tri) / period) % 2) == 0
    raise ValueError(f"unknown pattern {kind!r}")


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth star-shaped polygon: (points ``(n, 2)`` int32, radius per angle ``(n,)``)."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.full(n, r, dtype=np.float64)
    for k, amp in ((1, 0.18), (2, 0.14), (3, 0.08)):
        rad *= 1 + rng.uniform(-amp, amp) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.65, 1.0)
    rot = rng.uniform(0, np.pi)
    px = rad * np.cos(theta)
    py = rad * np.sin(theta) * stretch
    x = cx + px * np.cos(rot) - py * np.sin(rot)
    y = cy + px * np.sin(rot) + py * np.cos(rot)
    return np.stack([x, y], 1).round().astype(np.int32), theta


def render_sample(cfg: SynthConfig, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """Render image ``index``: (image ``(S,S,3)`` uint8, mask ``(S,S)`` uint8, part mask, label ids).

    Deterministic in ``(cfg.seed, index)`` and independent of every other image.
    """
    rng = np.random.default_rng([cfg.seed, index, 0x5EED])
    S = cfg.size
    n_cls = len(cfg.classes)
    if n_cls > len(PATTERNS):
        raise DataError(f"synthetic data supports at most {len(PATTERNS)} classes, got {n_cls}")

    # background: gradient between two muted colours
    c0 = _hsv_colour(rng, (0.0, 0.5), (0.25, 0.85))
    c1 = _hsv_colour(rng, (0.0, 0.5), (0.25, 0.85))
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    t = np.clip(0.5 + (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t

    # clutter: shapes with the same colour statistics as object bodies
    for _ in range(cfg.clutter):
        col = tuple(float(v) for v in _hsv_colour(rng, (0.2, 0.9), (0.3, 0.95)))
        kind = rng.integers(0, 3)
        x0, y0 = rng.integers(0, S, 2)
        if kind == 0:
            w, h = rng.integers(S // 24, S // 6, 2)
            cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), col, -1)
        elif kind == 1:
            ax = (int(rng.integers(S // 32, S // 9)), int(rng.integers(S // 32, S // 9)))
            cv2.ellipse(img, (int(x0), int(y0)), ax, float(rng.uniform(0, 180)), 0, 360, col, -1)
        else:
            x1, y1 = rng.integers(0, S, 2)
            cv2.line(img, (int(x0), int(y0)), (int(x1), int(y1)), col, int(rng.integers(1, max(2, S // 40))))

    mask = np.zeros((S, S), np.uint8)
    part_mask = np.zeros((S, S), np.uint8)
    parts: list[np.ndarray] = []  # visible part region of every placed object
    labels: set[int] = set()
    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    for _ in range(n_obj):
        cls = int(rng.integers(1, n_cls + 1))
        for _attempt in range(8):
            r = rng.uniform(*cfg.object_radius) * S
            cx, cy = rng.uniform(0.25 * S, 0.75 * S, 2)
            pts, theta = _blob(rng, cx, cy, r)
            body = np.zeros((S, S), np.uint8)
            cv2.fillPoly(body, [pts], 1)
            body_b = body.astype(bool)
            # the part: a disc on the body's rim, area ~ part_frac of the object
            px, py = pts[int(rng.integers(0, len(theta)))]
            pr = max(3.0, np.sqrt(cfg.part_frac * body_b.sum() / np.pi))
            pcx, pcy = cx + (px - cx) * 0.92, cy + (py - cy) * 0.92
            part = np.zeros((S, S), np.uint8)
            cv2.circle(part, (int(round(pcx)), int(round(pcy))), int(round(pr)), 1, -1)
            part_b = part.astype(bool)
            obj = body_b | part_b
            # a placement that hides more than a third of an earlier part would make its label a lie
            visible = part_b.sum() >= 0.66 * np.pi * pr * pr  # not cut off by the image border
            if visible and all((p & ~obj).sum() >= 0.66 * p.sum() for p in parts):
                break
        else:
            continue
        body_col = _hsv_colour(rng, (0.2, 0.9), (0.3, 0.95))
        shade = 1.0 + 0.12 * ((xx - cx / S) * np.cos(ang) + (yy - cy / S) * np.sin(ang))[..., None]
        img = np.where(body_b[..., None], body_col * shade, img)
        pa, pb = _part_colours(rng, cls, n_cls)
        period = cfg.texture_period * rng.uniform(0.9, 1.15)
        tex = _pattern(PATTERNS[cls - 1], S, S, pcx, pcy, period=period, angle=rng.uniform(0, np.pi))
        img = np.where((part_b & tex)[..., None], pa, np.where(part_b[..., None], pb, img))
        mask[obj] = cls
        part_mask[obj] = 0
        part_mask[part_b] = cls
        parts = [p & ~obj for p in parts] + [part_b]
        labels.add(cls)

    noise = rng.normal(0, 5.0, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img, mask, part_mask, tuple(sorted(labels))


def generate(cfg: SynthConfig, out: str | Path, force: bool = False) -> Path:
    """Write the synthetic dataset to ``out`` (atomically: a temp folder renamed at the end).

    If ``out`` already holds a dataset made with identical parameters it is reused as is.
    Returns ``out``.
    """
    out = Path(out)
    params = config_to_dict(cfg)
    stamp = {"generator": "wsss.data.synth", "wsss_version": __version__, "params": params, "hash": config_hash(params)}
    if out.exists():
        marker = out / "synth.json"
        if marker.is_file() and not force:
            try:
                old = read_json(marker)
            except DataError:
                old = {}
            if old.get("hash") == stamp["hash"]:
                log.info("synthetic dataset already at %s (same parameters); reusing it", out)
                return out
            raise DataError("folder exists with a dataset made from other parameters (use --force to replace it)", out)
        if not force and any(out.iterdir()):
            raise DataError("output folder exists and is not empty (use --force to replace it)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # the temp folder of a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        names = ["background", *cfg.classes]
        splits = {"train": range(cfg.n_train), "val": range(cfg.n_train, cfg.n_train + cfg.n_val)}
        rows = ["image,labels"]
        total = cfg.n_train + cfg.n_val
        bar = progress(total=total, desc="synth", unit="img")
        for split, rng_idx in splits.items():
            ids = []
            for i in rng_idx:
                img, mask, part, labels = render_sample(cfg, i)
                sid = f"{split}_{i:05d}"
                write_image(tmp / "JPEGImages" / f"{sid}.jpg", img, quality=95)
                write_palette_png(tmp / "SegmentationClass" / f"{sid}.png", mask)
                write_palette_png(tmp / "SegmentationPart" / f"{sid}.png", part)
                rows.append(f"{sid},{' '.join(names[c] for c in labels)}")
                ids.append(sid)
                bar.update(1)
            write_text(tmp / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
        bar.close()
        write_text(tmp / "classes.txt", "\n".join(names) + "\n")
        write_text(tmp / "labels.csv", "\n".join(rows) + "\n")
        write_text(tmp / "README.md", _README.format(n_train=cfg.n_train, n_val=cfg.n_val, size=cfg.size, classes=", ".join(cfg.classes)))
        write_json(tmp / "synth.json", stamp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synth: wrote %d train + %d val images (%dx%d, %d classes) to %s", cfg.n_train, cfg.n_val, cfg.size, cfg.size, len(cfg.classes), out)
    return out


_README = """# wsss synthetic dataset

Generated by `wsss data synth` ({n_train} train, {n_val} val, {size}x{size} pixels; classes: {classes}).
Each object is a class-agnostic body plus a small part carrying a class-specific texture; the mask covers
both. `SegmentationPart/` holds the parts alone. Regenerate it with the parameters in `synth.json`.
"""
