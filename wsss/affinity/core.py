"""Learned pixel affinities and the random walk that spreads CAMs along them (pure functions).

A small head on the frozen classifier's multi-level features embeds every cell of a stride-8 grid;
the affinity of two cells within ``radius`` is ``exp(-mean |e_i - e_j|)`` (AffinityNet, Ahn & Kwak
2018). It is trained on the confident pixels of the CRF pseudo-masks: pairs with the same label
(background or the same class) should have affinity 1, pairs with different labels affinity 0.
A random walk with the transition matrix ``T = D^-1 A^beta`` then spreads each class map over the
cells its object's pixels connect to, and stops at edges where affinity is low.

Shapes: features ``(B, C_l, H/s_l, W/s_l)`` per level, embeddings ``(B, D, h, w)`` with
``h = ceil(H / 8)``, maps ``(k, h, w)``, labels ``(h, w)`` int64 with ``IGNORE`` for unknown cells.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsss.io import IGNORE

GRID_STRIDE = 8


def grid_size(h: int, w: int) -> tuple[int, int]:
    """The stride-8 grid of an ``h`` x ``w`` image (ceil, as padded stride-2 convolutions give)."""
    return math.ceil(h / GRID_STRIDE), math.ceil(w / GRID_STRIDE)


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` to the neighbours within ``radius`` cells, one of each symmetric pair
    (``dy > 0``, or ``dy == 0`` and ``dx > 0``)."""
    if radius < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    out = [(0, dx) for dx in range(1, radius + 1)]
    out += [(dy, dx) for dy in range(1, radius + 1) for dx in range(-radius, radius + 1) if dy * dy + dx * dx <= radius * radius]
    return out


def _windows(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices of the cells ``p`` and their neighbours ``p + (dy, dx)`` that both lie in the grid."""
    x0, x1 = (0, w - dx) if dx >= 0 else (-dx, w)
    return (slice(0, h - dy), slice(x0, x1)), (slice(dy, h), slice(x0 + dx, x1 + dx))


def pair_affinities(emb: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Affinities ``exp(-mean_c |e_p - e_q|)`` of every in-grid pair, concatenated over ``offsets``
    in :func:`pair_indices` order; ``emb (D, h, w)`` -> ``(n_pairs,)``."""
    h, w = emb.shape[-2:]
    out = []
    for dy, dx in offsets:
        a, b = _windows(h, w, dy, dx)
        out.append(torch.exp(-(emb[:, a[0], a[1]] - emb[:, b[0], b[1]]).abs().mean(0)).flatten())
    return torch.cat(out)


def pair_indices(h: int, w: int, offsets: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cell indices ``(p, q)`` of the pairs of :func:`pair_affinities`, each ``(n_pairs,)``."""
    idx = torch.arange(h * w).view(h, w)
    ps, qs = [], []
    for dy, dx in offsets:
        a, b = _windows(h, w, dy, dx)
        ps.append(idx[a].flatten())
        qs.append(idx[b].flatten())
    return torch.cat(ps), torch.cat(qs)


def grid_labels(mask: np.ndarray, num_classes: int, min_share: float) -> torch.Tensor:
    """Cell labels ``(h, w)`` of a pseudo-mask ``(H, W)`` with ids ``0..num_classes-1`` (0 = background;
    ``IGNORE`` and anything else = unknown): a cell takes the label of at least ``min_share`` of its 8x8 pixels, else ``IGNORE``. The input is
    not modified."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    h, w = grid_size(*mask.shape)
    m = np.full((h * GRID_STRIDE, w * GRID_STRIDE), num_classes, np.int64)
    m[: mask.shape[0], : mask.shape[1]] = np.where(mask < num_classes, mask, num_classes)
    cells = m.reshape(h, GRID_STRIDE, w, GRID_STRIDE).transpose(0, 2, 1, 3).reshape(h, w, -1)
    counts = np.stack([(cells == k).sum(-1) for k in range(num_classes + 1)], -1)
    lab = counts.argmax(-1)
    lab[(lab == num_classes) | (counts.max(-1) < min_share * cells.shape[-1])] = IGNORE
    return torch.from_numpy(lab)


def affinity_loss(emb: torch.Tensor, labels: torch.Tensor, offsets: Sequence[tuple[int, int]]) -> torch.Tensor | None:
    """AffinityNet's balanced loss on the labelled pairs: ``-log a`` over background pairs (weight 1/4)
    and same-class foreground pairs (1/4), ``-log(1 - a)`` over pairs of different labels (1/2).
    ``emb (D, h, w)``, ``labels (h, w)``; None when no pair is labelled."""
    h, w = labels.shape
    a = pair_affinities(emb, offsets).clamp(1e-5, 1 - 1e-5)
    p, q = pair_indices(h, w, offsets)
    lp, lq = labels.flatten()[p], labels.flatten()[q]
    valid = (lp != IGNORE) & (lq != IGNORE)
    same = valid & (lp == lq)
    terms = [(0.25, same & (lp == 0), -torch.log(a)), (0.25, same & (lp > 0), -torch.log(a)), (0.5, valid & (lp != lq), -torch.log(1 - a))]
    parts = [wt * v[sel].mean() for wt, sel, v in terms if sel.any()]
    return sum(parts) if parts else None


class AffinityHead(nn.Module):
    """Per level a 1x1 conv + GroupNorm + ReLU to ``width`` channels, all resized to the stride-8 grid,
    concatenated and mapped by a 1x1 conv to ``dim`` channels. ``forward(levels, size) -> (B, dim, h, w)``."""

    def __init__(self, level_channels: Sequence[int], width: int = 64, dim: int = 128) -> None:
        super().__init__()
        self.level_channels = list(level_channels)
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.GroupNorm(4, width), nn.ReLU(inplace=True))
                                  for c in level_channels)
        self.out = nn.Conv2d(width * len(self.level_channels), dim, 1)

    def forward(self, levels: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(levels) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} feature levels, got {len(levels)}")
        parts = []
        for f, proj in zip(levels, self.proj):
            f = proj(f)
            if f.shape[-2] > size[0]:
                f = F.adaptive_avg_pool2d(f, size)
            elif f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(f)
        return self.out(torch.cat(parts, 1))


def transition_matrix(emb: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """Sparse ``(n, n)`` random-walk matrix ``D^-1 (A^beta + I)`` of the grid ``emb (D, h, w)``
    (``n = h w``, symmetric affinities of the cells within ``radius``)."""
    h, w = emb.shape[-2:]
    offsets = pair_offsets(radius)
    a = pair_affinities(emb, offsets).pow(beta)
    p, q = pair_indices(h, w, offsets)
    n = h * w
    diag = torch.arange(n)
    rows, cols = torch.cat([p, q, diag]), torch.cat([q, p, diag])
    vals = torch.cat([a, a, torch.ones(n, dtype=a.dtype)])
    deg = torch.zeros(n, dtype=a.dtype).index_add_(0, rows, vals)
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals / deg[rows], (n, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR products are ~20x faster than COO here
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


def random_walk(maps: torch.Tensor, transition: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` random-walk steps of the maps ``(k, h, w)`` (each cell takes the affinity-weighted
    mean of its neighbours); returns new maps, the input is not modified."""
    k, h, w = maps.shape
    v = maps.reshape(k, h * w).T.contiguous()
    for _ in range(steps):
        v = transition @ v
    return v.T.reshape(k, h, w)


NORMALISE = ("class", "image")


def walk_full_resolution(cams: np.ndarray, emb: torch.Tensor, radius: int, beta: float, steps: int) -> torch.Tensor:
    """Full-resolution maps ``(k, H, W)`` -> walked maps ``(k, H, W)`` float32, non-negative, not
    normalised: averaged over the stride-8 cells of ``emb (D, h, w)``, walked, upsampled bilinearly."""
    k, H, W = cams.shape
    h, w = emb.shape[-2:]
    if (h, w) != grid_size(H, W):
        raise ValueError(f"embedding grid {h}x{w} does not match the {H}x{W} maps (expected {grid_size(H, W)})")
    pad = torch.zeros(1, k, h * GRID_STRIDE, w * GRID_STRIDE)
    pad[0, :, :H, :W] = torch.from_numpy(cams.astype(np.float32))
    small = F.avg_pool2d(pad, GRID_STRIDE)[0]
    walked = random_walk(small, transition_matrix(emb.float(), radius, beta), steps)
    up = F.interpolate(walked[None], size=(h * GRID_STRIDE, w * GRID_STRIDE), mode="bilinear", align_corners=False)[0, :, :H, :W]
    return up.clamp_min(0)


def refine_maps(cams: np.ndarray, emb: torch.Tensor, radius: int, beta: float, steps: int,
                normalise: str = "class") -> np.ndarray:
    """Full-resolution CAMs ``(k, H, W)`` in [0, 1] -> random-walked maps ``(k, H, W)`` float32 in [0, 1].
    ``emb (D, h, w)``: the image's embedding on its stride-8 grid. ``normalise``: ``"class"`` divides each
    walked map by its own maximum, ``"image"`` all of them by the largest (IRN's choice): a class whose
    few confident cells the walk averages away then stays weak instead of being stretched back to 1."""
    if normalise not in NORMALISE:
        raise ValueError(f"normalise must be one of {', '.join(NORMALISE)}, got {normalise!r}")
    k = cams.shape[0]
    if k == 0:
        return cams.astype(np.float32)
    up = walk_full_resolution(cams, emb, radius, beta, steps)
    peak = up.flatten(1).amax(1) if normalise == "class" else up.max().expand(k)
    return (up / peak.clamp_min(1e-5)[:, None, None]).numpy()
