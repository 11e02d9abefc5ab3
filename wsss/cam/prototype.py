"""Image-specific prototype refinement of CAMs (the inference half of SIPE, Chen et al. CVPR 2022).

A CAM marks an object's most discriminative parts and, for classes that always come with the same
surroundings, part of those surroundings too. Within one image, the backbone's multi-level features
tell the object's pixels from the rest far better than the class weights do. So: take the cells the
maps are sure of (a class's own confident cells, and background cells where every map is low), average
their features into one prototype per class and one for the background, and score every cell by how
much closer it is to its class's prototype than to the background's (cosine similarities). The result
is a map per class, max-normalised like a CAM, in which background that merely co-occurs with a class
falls back towards zero. No training; one extra backbone pass per image (batched with the
image's same-size neighbours).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from wsss.errors import ConfigError

GRID = 8  # prototypes and similarities live on a stride-8 grid of the maps


def grid_features(levels: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Multi-level features ``[(C_l, h_l, w_l), ...]`` -> ``(sum C_l, h, w)`` on the stride-8 grid of a
    ``size = (H, W)`` map: each level resized bilinearly and L2-normalised per cell, so every level
    weighs the same in a cosine similarity whatever its channel count."""
    h, w = -(-size[0] // GRID), -(-size[1] // GRID)
    parts = [F.normalize(F.interpolate(l[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0], dim=0)
             for l in levels]
    return torch.cat(parts, 0)


def seed_cells(small: torch.Tensor, fg: float, bg: float) -> torch.Tensor:
    """Seeds ``(k + 1, h, w)`` bool from grid maps ``small (k, h, w)`` in [0, 1]: row 0 the background
    (every map below ``bg``), row 1 + j class j's cells (its map is the largest there and above ``fg``).
    A class or the background without any such cell falls back to its single most confident cell, so
    that every prototype exists."""
    k, h, w = small.shape
    top, arg = small.max(0)
    fgs = [(arg == j) & (small[j] > fg) for j in range(k)]
    seeds = torch.stack([top < bg, *fgs])
    for j in range(k + 1):
        if not seeds[j].any():
            score = -top if j == 0 else small[j - 1]
            seeds[j].view(-1)[int(score.reshape(-1).argmax())] = True
    return seeds


def prototype_maps(levels: Sequence[torch.Tensor], cams: torch.Tensor, fg: float = 0.5, bg: float = 0.15) -> torch.Tensor:
    """Refined maps ``(k, H, W)`` in [0, 1] of ``cams (k, H, W)`` in [0, 1] (one image's labelled
    classes), from that image's backbone features ``levels`` (list of ``(C_l, h_l, w_l)``, any strides:
    see :func:`grid_features`). Map of class j: ``relu(cos(f, p_j) - cos(f, p_bg))``, upsampled and
    divided by its maximum. ``fg`` / ``bg``: the seed thresholds of :func:`seed_cells`. The inputs are
    not modified."""
    if cams.ndim != 3:
        raise ValueError(f"cams must be (k, H, W), got {tuple(cams.shape)}")
    if not levels:
        raise ValueError("prototype refinement needs at least one feature level")
    if not 0 <= bg <= fg <= 1:
        raise ValueError(f"need 0 <= bg <= fg <= 1, got bg={bg}, fg={fg}")
    k, H, W = cams.shape
    if k == 0:
        return cams.float().clone()
    feats = grid_features(levels, (H, W))
    c, h, w = feats.shape
    pad = cams.new_zeros((1, k, h * GRID, w * GRID), dtype=torch.float32)
    pad[0, :, :H, :W] = cams
    # area averaging over the zero padding lowers the border cells a little: they only ever lose seeds
    seeds = seed_cells(F.avg_pool2d(pad, GRID)[0], fg, bg).reshape(k + 1, -1).to(feats.dtype)
    flat = feats.reshape(c, -1)
    protos = F.normalize(seeds @ flat.T / seeds.sum(1, keepdim=True), dim=1)  # (k + 1, C)
    sim = protos @ F.normalize(flat, dim=0)  # (k + 1, h w)
    margin = (sim[1:] - sim[:1]).clamp_min(0).reshape(1, k, h, w)
    up = F.interpolate(margin, size=(h * GRID, w * GRID), mode="bilinear", align_corners=False)[0, :, :H, :W]
    return up / up.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)


class PrototypeRefiner:
    """``refiner(x (B, 3, h, w) normalised images, [cams (k_i, H, W)] * B) -> [refined cams] * B``: one
    batched pass of ``backbone`` (which must expose multi-level features) for the levels, then
    :func:`prototype_maps` per image with the seed thresholds."""

    def __init__(self, backbone, fg: float = 0.5, bg: float = 0.15) -> None:
        if not getattr(backbone, "level_channels", None):
            raise ConfigError(f"cam.refine=prototype needs a backbone with multi-level features; "
                              f"{getattr(backbone, 'name', type(backbone).__name__)} has none (set cam.refine=none)")
        self.backbone, self.fg, self.bg = backbone, fg, bg

    def __call__(self, x: torch.Tensor, cams: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(cams) != len(x):
            raise ValueError(f"{len(x)} images but {len(cams)} sets of maps")
        with torch.no_grad():
            levels = self.backbone.forward_levels(x)
        return [prototype_maps([l[i] for l in levels], c, self.fg, self.bg) for i, c in enumerate(cams)]
