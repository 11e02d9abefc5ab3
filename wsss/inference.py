"""Segmenter inference on photos: multi-scale + flip class probabilities, optional dense-CRF refinement,
colour overlays, and a whole list of photos into a folder of palette PNGs.

Inference: the long side is resized to ``resize_long`` (the training resolution) times each scale, the
softmax of every scale (and its mirror) is upsampled to the photo's size and averaged; optionally a
dense CRF refines it. Same-size images share a forward pass. PNGs are written atomically, so a
killed run resumes with the missing images.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss.config import CrfConfig, PredictConfig
from wsss.data.dataset import IMAGE_EXTS
from wsss.data.transforms import check_pair
from wsss.engine.core import autocast, resolve_device
from wsss.errors import DataError, ImageReadError, WsssError
from wsss.io import read_image, voc_palette, write_image, write_palette_png
from wsss.log import progress

if TYPE_CHECKING:
    from wsss.models.segmenter import Segmenter

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probs(model: "Segmenter", images: Sequence[np.ndarray], scales: Sequence[float] = (1.0,), flip: bool = True,
                  resize_long: int | None = None, device: torch.device | str = "cpu", amp: str = "none") -> np.ndarray:
    """Class probabilities ``(B, K, H, W)`` float32 of same-size ``images`` (each ``(H, W, 3)`` uint8),
    averaged over ``scales`` (relative to ``resize_long``, or to the photo when None) and mirroring."""
    if not images:
        raise ValueError("no images given")
    for im in images:
        check_pair(im)
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("images of one call must share their size")
    device = torch.device(device)
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1)
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    base = 1.0 if resize_long is None else resize_long / max(h, w)
    nhwc = getattr(model, "prefers_channels_last", False) and device.type == "cpu"
    total = None
    for s in scales:
        size = (max(1, round(h * base * s)), max(1, round(w * base * s)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        if nhwc:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model.forward_head(model.forward_features(xs)).float()
        p = torch.softmax(logits, 1)
        if flip:
            p = (p[: len(images)] + p[len(images):].flip(-1)) / 2
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        total = p if total is None else total + p
    return (total / len(scales)).cpu().numpy().astype(np.float32)


def refine_with_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Dense-CRF posterior ``(K, H, W)`` of ``probs (K, H, W)`` on ``image (H, W, 3)`` uint8."""
    from wsss.crf import dense_crf

    return dense_crf(image, -np.log(np.clip(probs, 1e-5, 1.0)), cfg)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image (H, W, 3)`` with the palette colour of ``mask (H, W)`` blended over foreground pixels
    (background and 255 left as they are)."""
    colours = voc_palette()[mask].astype(np.float32)
    fg = ((mask != 0) & (mask != 255))[..., None]
    out = np.where(fg, (1 - alpha) * image.astype(np.float32) + alpha * colours, image.astype(np.float32))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def restrict_to_labels(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``probs (K, H, W)`` with every class but background and ``labels`` set to 0 and each pixel
    renormalised: a photo's known image-level labels rule out the other classes. Returns a new array."""
    keep = np.zeros(probs.shape[0], bool)
    keep[0] = True
    keep[list(labels)] = True
    out = np.where(keep[:, None, None], probs, 0.0).astype(np.float32)
    return out / np.maximum(out.sum(0, keepdims=True), 1e-8)


def stored_cooccurrence(meta: dict, path: Path | None = None) -> np.ndarray:
    """The training labels' co-occurrence counts ``(K-1, K-1)`` a segmenter file's ``meta`` holds (``path``: for the error)."""
    if "cooccurrence" not in meta:
        raise WsssError("predict.exclusive_below needs the training labels' co-occurrence counts, which this segmenter "
                        "file lacks (trained before they were recorded): train it again or set predict.exclusive_below: null", path)
    return np.asarray(meta["cooccurrence"], np.int64)


def exclusive_classes(probs: np.ndarray, counts: np.ndarray, below: float) -> list[int]:
    """Foreground class ids (>= 1) of ``probs (K, H, W)`` that survive class exclusion: the classes that win
    a pixel, largest first (by arg-max pixels), each kept only if, for every class kept before it, the
    training photos tagged with both are at least ``below`` of the rarer class's photos (``counts (K-1, K-1)``
    from :meth:`wsss.data.dataset.Dataset.cooccurrence`). A pair the training labels never show either class of is not excluded."""
    counts = np.asarray(counts)
    if counts.shape != (probs.shape[0] - 1,) * 2:
        raise ValueError(f"co-occurrence counts of shape {counts.shape} do not fit {probs.shape[0]} classes")
    arg = probs.argmax(0)
    pixels = np.bincount(arg.ravel(), minlength=probs.shape[0])
    present = [c for c in np.argsort(-pixels[1:], kind="stable") + 1 if pixels[c] > 0]
    n = np.diag(counts)
    kept: list[int] = []
    for c in present:
        rarer = np.minimum(n[c - 1], n[[k - 1 for k in kept]])
        both = counts[c - 1, [k - 1 for k in kept]]
        if np.all((rarer == 0) | (both >= below * rarer)):
            kept.append(int(c))
    return sorted(kept)


def exclude_classes(probs: np.ndarray, counts: np.ndarray, below: float) -> np.ndarray:
    """``probs (K, H, W)`` restricted to background and its :func:`exclusive_classes`, renormalised; a new array."""
    return restrict_to_labels(probs, exclusive_classes(probs, counts, below))


def iter_probs(model: "Segmenter", items: Sequence[tuple[str, Path]], scales: Sequence[float], flip: bool, resize_long: int | None,
               device: torch.device, amp: str = "none", batch_size: int = 1,
               on_unreadable: Callable[[Path, ImageReadError], None] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, image (H, W, 3) uint8, probs (K, H, W))`` for ``items`` (``(id, image path)``), same-size photos
    sharing a forward pass (up to ``batch_size``), so not in the order given. An unreadable image goes to
    ``on_unreadable`` (without one, the error is raised)."""
    pending: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}

    def flush(key: tuple[int, int]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        group = pending.pop(key)
        probs = predict_probs(model, [im for _, im in group], scales, flip, resize_long, device, amp)
        for (sid, im), p in zip(group, probs):
            yield sid, im, p

    for sid, path in items:
        try:
            im = read_image(path)
        except ImageReadError as e:
            if on_unreadable is None:
                raise
            on_unreadable(path, e)
            continue
        pending.setdefault(im.shape[:2], []).append((sid, im))
        if len(pending[im.shape[:2]]) >= batch_size:
            yield from flush(im.shape[:2])
    for key in list(pending):
        yield from flush(key)


def prepare_model(model: "Segmenter", device: torch.device) -> "Segmenter":
    """``model`` on ``device`` in eval mode, channels-last on CPU when it prefers that (predict_probs feeds NHWC)."""
    model = model.to(device).eval()
    if device.type == "cpu" and getattr(model, "prefers_channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model


def predict_items(model: "Segmenter", items: Sequence[tuple[str, Path]], out_dir: str | Path, cfg: PredictConfig,
                  resize_long: int | None, crf_cfg: CrfConfig | None = None, skip_done: bool = True,
                  skip_unreadable: bool = False, labels: dict[str, Sequence[int]] | None = None,
                  cooccur: np.ndarray | None = None) -> dict:
    """Predict ``items`` (``(id, image path)``) into ``out_dir/<id>.png`` (+ overlays). ``labels`` (id ->
    class ids >= 1): restrict each photo to background + its labels before the CRF; without them and with
    ``cfg.exclusive_below``, to the :func:`exclusive_classes` of ``cooccur (K-1, K-1)``. Returns counts and,
    with ``skip_unreadable``, the images that could not be decoded (each logged and left out instead of
    stopping the batch): ``skipped``."""
    exclude = cfg.exclusive_below is not None and labels is None
    if exclude and cooccur is None:
        raise ValueError("predict.exclusive_below needs the training labels' co-occurrence counts")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overlay:
        (out_dir / "overlay").mkdir(exist_ok=True)
    device = resolve_device(cfg.device)
    model = prepare_model(model, device)
    todo = [(sid, p) for sid, p in items if not (skip_done and (out_dir / f"{sid}.png").is_file())]
    bar = progress(total=len(todo), desc="predict", unit="img")
    skipped: list[str] = []

    def unreadable(path: Path, e: ImageReadError) -> None:
        log.warning("predict: skipped %s", e)
        skipped.append(str(path))
        bar.update(1)

    t0 = time.perf_counter()
    for sid, im, p in iter_probs(model, todo, cfg.scales, cfg.flip, resize_long, device, cfg.amp, cfg.batch_size,
                                 unreadable if skip_unreadable else None):
        if labels is not None:
            p = restrict_to_labels(p, labels[sid])
        elif exclude:
            p = exclude_classes(p, cooccur, cfg.exclusive_below)
        if crf_cfg is not None:
            p = refine_with_crf(im, p, crf_cfg)
        mask = p.argmax(0).astype(np.uint8)
        if cfg.overlay:
            write_image(out_dir / "overlay" / f"{sid}.jpg", overlay(im, mask))
        write_palette_png(out_dir / f"{sid}.png", mask)
        bar.update(1)
    bar.close()
    secs = time.perf_counter() - t0
    done = len(todo) - len(skipped)
    return {"images": len(items), "computed": done, "reused": len(items) - len(todo),
            "seconds_per_image": round(secs / done, 4) if done else None, **({"skipped": skipped} if skip_unreadable else {})}


def label_maps(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Maps ``(k, H, W)`` in [0, 1] of a photo's ``labels`` (k class ids >= 1, in that order) from class
    probabilities ``probs (K, H, W)``: the probabilities renormalised over background and the labels
    (the tags rule out every other class). Does not modify ``probs``."""
    labels = list(labels)
    if not labels:
        return np.zeros((0, *probs.shape[1:]), np.float32)
    if min(labels) < 1 or max(labels) >= probs.shape[0]:
        raise ValueError(f"labels {labels} outside 1..{probs.shape[0] - 1}")
    return np.clip(restrict_to_labels(probs, labels)[labels], 0.0, 1.0)


def max_merge(classes: Sequence[int], maps: np.ndarray, other_classes: Sequence[int], other: np.ndarray) -> np.ndarray:
    """Per pixel and class the larger of ``maps (k, H, W)`` (of class ids ``classes``) and ``other (m, H, W)``
    (of ``other_classes``), matched by class id; a class ``other`` lacks keeps its map. Returns
    ``(k, H, W)``; modifies neither input."""
    if other.shape[1:] != maps.shape[1:]:
        raise ValueError(f"maps of size {maps.shape[1:]} and {other.shape[1:]} cannot be merged")
    out = np.array(maps, np.float32, copy=True)
    where = {int(c): i for i, c in enumerate(other_classes)}
    for i, c in enumerate(classes):
        if int(c) in where:
            np.maximum(out[i], other[where[int(c)]], out=out[i])
    return out


def write_label_maps(model: "Segmenter", items: Sequence[tuple[str, Path, Sequence[int]]], out_dir: str | Path,
                     scales: Sequence[float], flip: bool, resize_long: int | None, device: torch.device,
                     batch_size: int = 8, merge_dir: str | Path | None = None) -> int:
    """Each ``(id, image path, labels)`` photo's :func:`label_maps` into ``out_dir/<id>.npz`` (the CAM
    format, written atomically); photos whose file exists are skipped (a killed run resumes). With
    ``merge_dir``, each photo's maps are merged by :func:`max_merge` with ``merge_dir/<id>.npz`` (CAM format).
    Returns how many were computed."""
    from wsss.camfile import load_cam, save_cam

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(sid, path) for sid, path, _ in items if not (out_dir / f"{sid}.npz").is_file()]
    labels = {sid: tuple(lab) for sid, _, lab in items}
    model = prepare_model(model, device)
    bar = progress(total=len(todo), desc="seg-maps: maps", unit="img")
    for sid, _, p in iter_probs(model, todo, scales, flip, resize_long, device, batch_size=batch_size):
        dest = out_dir / f"{sid}.npz"
        dest.parent.mkdir(parents=True, exist_ok=True)  # ids may hold folders
        maps = label_maps(p, labels[sid])
        if merge_dir is not None:
            classes, cams = load_cam(Path(merge_dir) / f"{sid}.npz", p.shape[0] - 1, size=maps.shape[1:])
            maps = max_merge(labels[sid], maps, classes, cams)
        save_cam(dest, np.array(labels[sid], np.int64), maps)
        bar.update(1)
    bar.close()
    return len(todo)


def input_items(paths: Iterable[str | Path], recursive: bool = False) -> list[tuple[str, Path]]:
    """``(id, path)`` for image files and the images inside folders: directly inside, or with ``recursive``
    in every subfolder too (ids: the path below the folder without its suffix, e.g. ``trip/x``)."""
    items: list[tuple[str, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir()) if f.suffix.lower() in IMAGE_EXTS and f.is_file())
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) in folder{' or its subfolders' if recursive else ''}", p)
            items += [(f.relative_to(p).with_suffix("").as_posix(), f) for f in found]
        elif p.is_file():
            items.append((p.stem, p))
        else:
            raise DataError("input not found", p)
    seen: dict[str, Path] = {}
    for sid, p in items:
        if sid in seen:
            raise DataError(f"two inputs would write the same output {sid}.png ({seen[sid]} and {p})")
        seen[sid] = p
    return items

