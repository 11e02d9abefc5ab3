"""`wsss inspect RUN_DIR`: a static HTML gallery of a run's maps and masks, and mask statistics.

Output ``RUN/inspect/<split>/``::

    index.html      one card per image: photo, CAM heatmap per labelled class, expanded CAM, pseudo-mask,
                    ground truth and prediction overlays (whichever exist), per-image IoU; filter by class,
                    sort by worst IoU; class legend in the palette colours. Opens from file:// (no server).
    img/            the thumbnails (JPEG)

Everything shown is read from the run's files; ground truth only for display and IoU.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import cv2
import numpy as np

from wsss.camfile import load_cam
from wsss.data.dataset import Dataset
from wsss.errors import WsssError
from wsss.io import IGNORE, read_image, read_mask, voc_palette, write_image, write_text
from wsss.log import progress
from wsss.pipeline.table import get_stage, stage_folder
from wsss.evaluation.metrics import confusion, iou_from_confusion

log = logging.getLogger(__name__)


def heatmap(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image (H, W, 3)`` uint8 blended with the JET colours of ``cam (H, W)`` (scaled by its max)."""
    top = float(cam.max())
    scaled = np.clip(cam / top, 0, 1) if top > 0 else np.zeros_like(cam)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return ((1 - alpha) * image + alpha * colours).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Palette colours of every pixel of ``mask`` (background black, 255 light grey) blended over ``image``."""
    return ((1 - alpha) * image + alpha * voc_palette()[mask]).astype(np.uint8)


IOU_LABELS = {"pseudo": "pseudo-mask", "seg-maps": "segmenter-map pseudo-mask", "affinity": "affinity pseudo-mask", "pred": "prediction"}


def image_miou(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """mIoU (%) over the classes present in ``gt`` or ``pred``, on pixels neither marks 255."""
    cm = confusion(gt, pred, num_classes)
    present = (cm.sum(0) + cm.sum(1)) > 0
    if not present.any():
        return float("nan")
    return round(100 * float(np.nanmean(iou_from_confusion(cm)[present])), 1)


def _thumb(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(1.0, long_side / max(h, w))
    if s == 1.0:
        return image
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


@dataclass
class Card:
    id: str
    classes: list[str]
    tiles: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative image path)
    iou: dict[str, float] = field(default_factory=dict)  # "pseudo" / "pred" -> mIoU


def build_gallery(ds: Dataset, run_dir: Path, out: Path, pred_dir: Path | None, limit: int = 200,
                  thumb: int = 240) -> list[Card]:
    """Write the thumbnails of the first ``limit`` images of ``ds`` (0 = all) into ``out/img``; returns
    one :class:`Card` per image."""
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    k = len(ds.classes)
    cards = []
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    for i in progress(range(n), desc="inspect", unit="img"):
        s = ds[i]
        photo = read_image(s.image)
        card = Card(s.id, [ds.classes[c] for c in s.labels])
        tiles: list[tuple[str, np.ndarray]] = [("photo", photo)]
        for stage, caption in (("cam", "CAM"), ("expand", "expanded")):
            path = run_dir / stage_folder(stage) / f"{s.id}.npz"
            if path.is_file():
                classes, cam = load_cam(path, k)
                for c, m in zip(classes, cam):
                    tiles.append((f"{caption} {ds.classes[c]}", heatmap(photo, m)))
        gt = ds.read_mask(i) if s.mask is not None else None
        masks = [("pseudo", "pseudo-mask", run_dir / stage_folder("crf")),
                 ("seg-maps", "segmenter-map pseudo-mask", run_dir / stage_folder("seg-maps") / get_stage("seg-maps").masks),
                 ("affinity", "affinity pseudo-mask", run_dir / stage_folder("affinity") / get_stage("affinity").masks),
                 ("pred", "prediction", pred_dir)]
        for name, caption, folder in masks:
            if folder is not None and (folder / f"{s.id}.png").is_file():
                mask = read_mask(folder / f"{s.id}.png")
                tiles.append((caption, mask_overlay(photo, mask)))
                if gt is not None:
                    card.iou[name] = image_miou(gt, mask, k)
        if gt is not None:
            tiles.append(("ground truth", mask_overlay(photo, gt)))
        for j, (caption, im) in enumerate(tiles):
            name = f"{s.id}_{j}.jpg"
            write_image(img_dir / name, _thumb(im, thumb), quality=85)
            card.tiles.append((caption, f"img/{name}"))
        cards.append(card)
    return cards


_SCRIPT = """
(function () {
  var grid = document.getElementById('grid');
  var cards = Array.prototype.slice.call(grid.children);
  var cls = document.getElementById('cls'), sort = document.getElementById('sort'), count = document.getElementById('count');
  function num(c, key) { var v = parseFloat(c.getAttribute('data-' + key)); return isNaN(v) ? Infinity : v; }
  function update() {
    var want = cls.value, key = sort.value, shown = 0;
    var order = cards.slice();
    if (key !== 'id') { order.sort(function (a, b) { return num(a, key) - num(b, key); }); }
    order.forEach(function (c) {
      var ok = !want || (' ' + c.getAttribute('data-classes') + ' ').indexOf(' ' + want + ' ') >= 0;
      c.style.display = ok ? '' : 'none';
      if (ok) { shown += 1; }
      grid.appendChild(c);
    });
    count.textContent = shown + ' of ' + cards.length + ' images';
  }
  cls.addEventListener('change', update);
  sort.addEventListener('change', update);
  update();
  document.body.setAttribute('data-ready', 'yes');
})();
"""


#: left as they are in a file link (``'`` is HTML-escaped instead); '#', '?', '%', spaces and non-ASCII are encoded
_URL_SAFE = "/'"


def render_gallery(cards: Sequence[Card], classes: Sequence[str], title: str) -> str:
    """The gallery page; every name from files or configs is HTML-escaped, every file link URL-encoded."""
    e = html.escape
    pal = voc_palette()
    legend = "".join(f"<span class=lg><i style='background:rgb{tuple(int(v) for v in pal[i])}'></i>{e(c)}</span>"
                     for i, c in enumerate(classes)) + f"<span class=lg><i style='background:rgb{tuple(int(v) for v in pal[IGNORE])}'></i>ignore (255)</span>"
    options = "".join(f"<option value='{e(c)}'>{e(c)}</option>" for c in classes[1:])
    has = {key for c in cards for key in c.iou}
    sorts = "<option value=id>image id</option>" + "".join(
        f"<option value='iou-{k}'>worst {label} IoU first</option>" for k, label in IOU_LABELS.items()
        if k in has)
    items = []
    for c in cards:
        ious = " ".join(f"data-iou-{k}='{v}'" for k, v in c.iou.items())
        iou_text = ", ".join(f"{IOU_LABELS[k]} mIoU {v:.1f}" for k, v in c.iou.items())
        tiles = "".join(f"<figure><img loading=lazy src='{e(quote(p, safe=_URL_SAFE))}' alt='{e(cap)}'><figcaption>{e(cap)}</figcaption></figure>"
                        for cap, p in c.tiles)  # file names are data: '#', '?', '%', spaces must not end or change the URL
        items.append(f"<div class=card data-classes='{e(' '.join(c.classes))}' {ious}><h3>{e(c.id)} "
                     f"<small>{e(', '.join(c.classes))}{' · ' + e(iou_text) if iou_text else ''}</small></h3>{tiles}</div>")
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1em;background:#fafafa;color:#222}}
.card{{background:#fff;border:1px solid #ddd;margin:0 0 1em;padding:.5em}}h3{{margin:.2em 0}}h3 small{{color:#666;font-weight:normal}}
figure{{display:inline-block;margin:3px;text-align:center}}figcaption{{font-size:12px;color:#444}}
.lg{{margin-right:1em;white-space:nowrap}}.lg i{{display:inline-block;width:14px;height:14px;border:1px solid #999;margin-right:4px;vertical-align:middle}}
.bar{{position:sticky;top:0;background:#fafafa;padding:.5em 0;border-bottom:1px solid #ddd;margin-bottom:1em}}</style></head>
<body><h1>{e(title)}</h1><div class=bar>class <select id=cls><option value=''>all</option>{options}</select>
sort <select id=sort>{sorts}</select> <span id=count></span><div>{legend}</div></div>
<div id=grid>{''.join(items)}</div><script>{_SCRIPT}</script></body></html>"""


def default_split(run_dir: str | Path) -> str:
    """The split a run's CAMs (and so its pseudo-masks) were made for."""
    from wsss.manifest import read_manifest

    return ((read_manifest(Path(run_dir) / stage_folder("cam")) or {}).get("config", {}).get("split", "train"))


def write_gallery(run_dir: str | Path, split: str | None = None, out: str | Path | None = None, limit: int = 200) -> Path:
    """Build ``RUN/inspect/<split>/index.html`` (default split: the one the CAMs were extracted for)."""
    from wsss.pipeline.runner import open_split
    run_dir = Path(run_dir)
    if not (run_dir / stage_folder("data") / "index.json").is_file():
        raise WsssError("not a wsss run directory (no data/index.json)", run_dir)
    split = split or default_split(run_dir)
    ds = open_split(run_dir, split)
    out = Path(out) if out else run_dir / "inspect" / split
    pred_dir = run_dir / stage_folder("predict", split=split)
    cards = build_gallery(ds, run_dir, out, pred_dir if pred_dir.is_dir() else None, limit)
    page = out / "index.html"
    write_text(page, render_gallery(cards, ds.classes, f"wsss run {run_dir.name}: {split} ({len(cards)} images)"))
    return page


def mask_statistics(ds: Dataset, mask_dir: str | Path) -> dict:
    """Class areas (share of all pixels), ignore share, and the images whose mask disagrees with their
    image-level labels (a labelled class with no pixel, or pixels of an unlabelled class)."""
    mask_dir = Path(mask_dir)
    k = len(ds.classes)
    area = np.zeros(k, np.int64)
    ignored = total = 0
    disagree = []
    for i, s in enumerate(progress(ds.samples, desc="stats", unit="img")):
        path = mask_dir / f"{s.id}.png"
        if not path.is_file():
            continue
        m = read_mask(path, num_classes=k)
        counts = np.bincount(m[m != IGNORE].ravel(), minlength=k)
        area += counts
        ignored += int((m == IGNORE).sum())
        total += m.size
        present = {c for c in range(1, k) if counts[c] > 0}
        missing, extra = set(s.labels) - present, present - set(s.labels)
        if missing or extra:
            disagree.append({"id": s.id, "missing": [ds.classes[c] for c in sorted(missing)],
                             "unlabelled": [ds.classes[c] for c in sorted(extra)]})
    n = sum(1 for s in ds if (mask_dir / f"{s.id}.png").is_file())
    return {"images": n, "class_area": {c: round(100 * a / max(total, 1), 2) for c, a in zip(ds.classes, area)},
            "ignore_share": round(100 * ignored / max(total, 1), 2), "disagree": disagree}


def open_in_browser(page: Path) -> None:
    import webbrowser

    webbrowser.open(page.resolve().as_uri())

