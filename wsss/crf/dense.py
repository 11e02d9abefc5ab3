"""Dense-CRF refinement of CAMs into pseudo-masks (pure functions: arrays in, arrays out).

Only the image's labelled classes and background take part, so the CRF is cheaper than over all
classes and cannot invent an absent class. Two modes (see :class:`wsss.config.CrfConfig`):

* ``probability``: background score from a constant threshold or ``(1 - max cam) ** alpha``; one CRF,
  every pixel labelled.
* ``confidence``: a foreground-confident pass (background score ``fg_threshold``) and a
  background-confident pass (background score ``low_threshold``), each refined by the CRF; pixels where
  the two disagree become 255 (ignore).

Imports numpy and pydensecrf only (no torch), so worker processes start quickly.
"""

from __future__ import annotations

import numpy as np

from wsss.io import IGNORE

_FLOOR = 1e-5  # smallest probability a label keeps, so that -log stays finite


def _check(image: np.ndarray, classes: np.ndarray, cams: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"cams must be (k, H, W) with k = len(classes) = {len(classes)}, got {cams.shape}")
    if cams.shape[1:] != image.shape[:2]:
        raise ValueError(f"cams are {cams.shape[1]}x{cams.shape[2]} but the image is {image.shape[0]}x{image.shape[1]}")
    if not np.isfinite(cams).all():
        raise ValueError("cams contain NaN or infinite values")


def dense_crf(image: np.ndarray, unary: np.ndarray, cfg) -> np.ndarray:
    """Mean-field posterior ``(n, H, W)`` float32 for unary energies ``unary (n, H, W)`` (-log p) on
    ``image (H, W, 3)`` uint8, with the pairwise kernels and iterations of ``cfg`` (a CrfConfig)."""
    return dense_crf_many(image, [unary], cfg)[0]


def dense_crf_many(image: np.ndarray, unaries: list[np.ndarray], cfg) -> list[np.ndarray]:
    """:func:`dense_crf` for several unaries ``(n, H, W)`` on the same image: the pairwise kernels (the
    permutohedral lattices, a large share of the cost) are built once and reused, the result is the same."""
    import pydensecrf.densecrf as dcrf

    n, h, w = unaries[0].shape
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                             compat=cfg.bilateral_compat)
    out = []
    for unary in unaries:
        if unary.shape != (n, h, w):
            raise ValueError(f"all unaries must be {(n, h, w)}, got {unary.shape}")
        # setUnaryEnergy replaces the previous unary; inference starts afresh from the new one
        crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(n, -1), dtype=np.float32))
        out.append(np.asarray(crf.inference(cfg.iterations), dtype=np.float32).reshape(n, h, w))
    return out


def unary_energy(scores: np.ndarray, cfg) -> np.ndarray:
    """Unary energies ``(n, H, W)`` from non-negative label scores ``(n, H, W)`` (label 0 = background).

    ``soft``: -log of the scores normalised to sum to one per pixel. ``labels``: the arg-max label gets
    probability ``gt_prob``, the others share the rest.
    """
    n = scores.shape[0]
    if cfg.unary == "labels":
        best = scores.argmax(0)
        p = np.full(scores.shape, (1.0 - cfg.gt_prob) / max(n - 1, 1), np.float32)
        np.put_along_axis(p, best[None], cfg.gt_prob, 0)
    else:
        total = scores.sum(0, keepdims=True)
        p = np.where(total > 0, scores / np.maximum(total, 1e-12), 1.0 / n)
    return -np.log(np.clip(p, _FLOOR, 1.0)).astype(np.float32)


def refine(image: np.ndarray, cams: np.ndarray, bg: float | np.ndarray, cfg) -> np.ndarray:
    """CRF label indices ``(H, W)`` (0 = background, i = ``cams[i - 1]``) for ``cams (k, H, W)`` with
    background score ``bg`` (a constant or an ``(H, W)`` map)."""
    return refine_many(image, cams, [bg], cfg)[0]


def refine_many(image: np.ndarray, cams: np.ndarray, bgs: list[float | np.ndarray], cfg) -> list[np.ndarray]:
    """:func:`refine` for several background scores, sharing one CRF's pairwise kernels."""
    fg = cams.astype(np.float32, copy=False)
    unaries = []
    for bg in bgs:
        bg_map = np.broadcast_to(np.asarray(bg, np.float32), cams.shape[1:])
        unaries.append(unary_energy(np.concatenate([bg_map[None], fg]), cfg))
    return [post.argmax(0) for post in dense_crf_many(image, unaries, cfg)]


def pseudo_mask(image: np.ndarray, classes: np.ndarray, cams: np.ndarray, cfg) -> np.ndarray:
    """Pseudo-mask ``(H, W)`` uint8 (0 background, class ids, 255 ignore) from max-normalised CAMs
    ``cams (k, H, W)`` in [0, 1] of class ids ``classes (k,)`` on ``image (H, W, 3)`` uint8."""
    classes = np.asarray(classes, np.int64)
    _check(image, classes, cams)
    if len(classes) == 0:
        return np.zeros(image.shape[:2], np.uint8)
    ids = np.concatenate([[0], classes]).astype(np.uint8)
    if cfg.mode == "probability":
        bg = cfg.bg_threshold if cfg.bg_score == "threshold" else np.power(1.0 - cams.max(0), cfg.alpha)
        return ids[refine(image, cams, bg, cfg)]
    fg, bg = refine_many(image, cams, [cfg.fg_threshold, cfg.low_threshold], cfg)
    out = ids[fg]
    out[fg != bg] = IGNORE
    return out


def mask_stats(mask: np.ndarray) -> dict[str, float | list[int]]:
    """Classes present (ids >= 1), foreground share and ignore share of a pseudo-mask ``(H, W)``."""
    n = mask.size
    present = sorted(int(c) for c in np.unique(mask) if 0 < c < IGNORE)
    ignore = int((mask == IGNORE).sum())
    fg = n - ignore - int((mask == 0).sum())
    return {"classes": present, "fg_share": fg / n, "ignore_share": ignore / n}
