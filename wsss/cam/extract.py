"""Batched multi-scale + flip CAM extraction.

For every image, the maps of its labelled classes are computed at each scale on the image and its
mirror, upsampled to the image size, un-mirrored, summed, and max-normalised per class. Images of the
same size are batched together, and each forward pass covers an image and its mirror, so the work
per scale is one pass per batch, whatever the number of classes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss.cam.methods import CAMMethod

if TYPE_CHECKING:
    from wsss.config import CamConfig
    from wsss.data.dataset import Dataset

log = logging.getLogger(__name__)


def _normalise(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def _chunked(method: CAMMethod, x: torch.Tensor, classes: torch.Tensor, max_pixels: int | None,
             layout: torch.memory_format) -> torch.Tensor:
    """``method`` on ``x (N, 3, h, w)`` in chunks of at most ``max_pixels`` input pixels (>= 1 image)."""
    n, _, h, w = x.shape
    per = n if max_pixels is None else max(1, max_pixels // (h * w))
    outs = [method(x[i:i + per].contiguous(memory_format=layout), classes) for i in range(0, n, per)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def multiscale_maps(method: CAMMethod, x: torch.Tensor, classes: torch.Tensor, scales: Sequence[float],
                    flip: bool = True, out_size: tuple[int, int] | None = None,
                    layout: torch.memory_format = torch.contiguous_format, max_pixels: int | None = None) -> torch.Tensor:
    """Summed raw maps ``(B, k, H, W)`` of a same-size batch ``x (B, 3, H, W)`` for ``classes (k,)``.

    ``out_size`` defaults to the input size; maps are not normalised. ``max_pixels`` caps the input
    pixels of one forward pass (the batch and its mirror are split to fit).
    """
    b, _, h, w = x.shape
    size = out_size or (h, w)
    total = torch.zeros(b, len(classes), *size, device=x.device)
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear", align_corners=False)
        if flip:
            xs = torch.cat([xs, xs.flip(-1)])
        m = _chunked(method, xs, classes, max_pixels, layout)
        if flip:
            # bilinear resizing commutes with mirroring, so un-mirror and add before the (costly)
            # upsampling to full resolution: one resize per scale instead of two
            m = m[:b] + m[b:].flip(-1)
        total += F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return total


def max_normalise(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide each map ``(..., H, W)`` by its maximum (maps must be >= 0); maps whose maximum is below
    ``eps`` (all-zero ones included) are divided by ``eps`` instead, so they stay near zero."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(eps)


def extract_cams(method: CAMMethod, images: Iterable[tuple[str, np.ndarray, Sequence[int]]], *,
                 mean: Sequence[float], std: Sequence[float], scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0),
                 flip: bool = True, batch_size: int = 8, batch_pixels: int | None = None, resize_long: int | None = None,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 max_side: int | None = None,
                 refine: Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]] | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(id, classes (k,) int16, cams (k, H, W) float32 in [0, 1])`` for each input image.

    ``images`` yields ``(id, image (H, W, 3) uint8, class ids (>= 1))``. Images are grouped by size
    (up to ``batch_size``) so that each forward pass serves several images, with at most
    ``batch_pixels`` input pixels per pass; results come out in batches, not necessarily in input order. ``resize_long`` runs the network on an image resized
    so that its long side has that length; maps are always returned at the original resolution.
    ``channels_last`` runs the network in NHWC layout (the model must already be in that layout).
    ``max_side`` bounds the memory per image: a photo with a longer side is processed (network and maps)
    at that long side and its final maps resized to the photo (``resize_long``, when set, decides alone).
    ``refine(x (B, 3, h, w), [maps (k_i, h', w')] * B) -> [maps] * B`` re-scores the normalised maps of a
    batch of images from their network input, ``batch_pixels`` at a time (e.g.
    :class:`wsss.cam.prototype.PrototypeRefiner`).
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pending: dict[tuple[int, int], list] = defaultdict(list)

    def flush(key):
        group = pending.pop(key)
        x = torch.stack([_normalise(img, mean, std) for _, img, _ in group]).to(device)
        h, w = group[0][1].shape[:2]
        capped = not resize_long and max_side is not None and max(h, w) > max_side
        long_side = resize_long or (max_side if capped else None)
        if long_side and max(h, w) != long_side:
            r = long_side / max(h, w)
            x = F.interpolate(x, size=(max(1, round(h * r)), max(1, round(w * r))), mode="bilinear", align_corners=False)
        union = sorted({c for _, _, cl in group for c in cl})
        cls_t = torch.tensor([c - 1 for c in union], dtype=torch.long)
        maps = multiscale_maps(method, x, cls_t, scales, flip, out_size=tuple(x.shape[-2:]) if capped else (h, w), layout=layout,
                               max_pixels=batch_pixels)
        col = {c: j for j, c in enumerate(union)}
        all_cams = [max_normalise(maps[i, torch.tensor([col[c] for c in cl], dtype=torch.long)]) for i, (_, _, cl) in enumerate(group)]
        if refine is not None:
            per = len(group) if batch_pixels is None else max(1, batch_pixels // (x.shape[-2] * x.shape[-1]))
            all_cams = [c for s in range(0, len(group), per)
                        for c in refine(x[s:s + per].contiguous(memory_format=layout), all_cams[s:s + per])]
        for (sid, _, cl), cams in zip(group, all_cams):
            if capped:
                cams = F.interpolate(cams[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
            yield sid, np.asarray(cl, dtype=np.int16), cams.cpu().numpy().astype(np.float32)

    for sid, img, cl in images:
        cl = sorted(int(c) for c in cl)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image '{sid}' must be (H, W, 3), got {img.shape}")
        key = img.shape[:2]
        if not cl:
            yield sid, np.zeros(0, np.int16), np.zeros((0, *key), np.float32)
            continue
        pending[key].append((sid, img, cl))
        if len(pending[key]) >= batch_size:
            yield from flush(key)
    for key in list(pending):
        yield from flush(key)


def extract_to_folder(model, ds: "Dataset", cfg: "CamConfig", out_dir: str | Path, device: torch.device,
                       mean, std) -> dict:
    """Write ``<id>.npz`` (see :mod:`wsss.camfile`) for every image of ``ds`` missing from ``out_dir``; returns
    counts: ``images``, ``computed``, ``reused``, ``empty`` (computed images whose every map is zero)."""
    from wsss.camfile import save_cam
    from wsss.cam.methods import create_cam_method
    from wsss.cam.prototype import PrototypeRefiner
    from wsss.log import progress
    from wsss.models.checkpoint import use_channels_last
    from wsss.models.inference import fold_batchnorm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, s in enumerate(ds) if not (out_dir / f"{s.id}.npz").is_file()]
    nhwc = use_channels_last(cfg.channels_last, model)
    # before folding: the folded backbone is a traced graph without forward_levels
    refine = PrototypeRefiner(model.backbone, cfg.prototype_fg, cfg.prototype_bg) if cfg.refine == "prototype" else None
    if cfg.fold_bn and cfg.target_layer == "features":
        model = fold_batchnorm(model)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    method = create_cam_method(cfg.method, model, cfg.target_layer)
    n_done = len(ds) - len(todo)
    if n_done:
        log.info("cam: %d of %d images already done, resuming", n_done, len(ds))

    def images():
        for i in todo:
            s = ds[i]
            yield s.id, ds.read_image(i), s.labels

    bar = progress(total=len(todo), desc=f"cam {cfg.method}", unit="img")
    empty = 0  # images whose every map is zero
    for sid, classes, cams in extract_cams(method, images(), mean=mean, std=std, scales=cfg.scales, flip=cfg.flip,
                                           batch_size=cfg.batch_size, batch_pixels=cfg.batch_pixels, resize_long=cfg.resize_long, device=device,
                                           channels_last=nhwc, max_side=cfg.max_side, refine=refine):
        save_cam(out_dir / f"{sid}.npz", classes, cams)
        empty += bool(len(classes)) and not cams.any()
        bar.update(1)
    bar.close()
    return {"images": len(ds), "computed": len(todo), "reused": n_done, "empty": empty}

