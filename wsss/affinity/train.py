"""Training the affinity head on pseudo-masks (on the engine's :func:`~wsss.engine.core.fit`) and walking
CAMs along its affinities; the pure functions are in :mod:`wsss.affinity.core`.

The head learns from the confident pixels of a pseudo-mask folder (255 = unknown), one image per step
with random horizontal flips; the backbone (a trained classifier's) stays frozen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from wsss.affinity.core import AffinityHead, affinity_loss, grid_labels, grid_size, pair_offsets, refine_maps
from wsss.camfile import load_cam, save_cam
from wsss.config import AffinityConfig
from wsss.data.dataset import Dataset
from wsss.data.transforms import to_tensor
from wsss.engine.core import fit
from wsss.errors import DataError
from wsss.io import read_mask
from wsss.log import progress
from wsss.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def _input(image: np.ndarray, mean, std, device: torch.device) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> normalised ``(1, 3, H, W)`` float32 on ``device``."""
    return to_tensor(image, mean, std)[None].to(device)


def embed(backbone, head: AffinityHead, x: torch.Tensor) -> torch.Tensor:
    """Embedding ``(D, h, w)`` of one normalised image ``x (1, 3, H, W)`` (backbone frozen, no gradient)."""
    if backbone.prefers_channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        levels = backbone.forward_levels(x)
    return head(levels, grid_size(*x.shape[-2:]))[0]



class AffinityData(torch.utils.data.Dataset):
    """``(image (3, H, W), cell labels (h, w))`` of ``ds`` with its masks in ``mask_dir``. Setting ``epoch``
    draws that epoch's order and flips from an RNG seeded by ``(seed, epoch)``: a resumed run draws the same."""

    def __init__(self, ds: Dataset, mask_dir: Path, cfg: AffinityConfig, mean, std, seed: int = 0) -> None:
        self.ds, self.mask_dir, self.cfg, self.mean, self.std, self.seed = ds, mask_dir, cfg, mean, std, seed
        self.order, self.flip = np.arange(len(ds)), np.zeros(len(ds), bool)

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.order, flips = rng.permutation(len(self.ds)), rng.random(len(self.ds)) < 0.5
        self.flip = np.empty(len(self.ds), bool)
        self.flip[self.order] = flips  # the j-th image of the epoch gets the j-th draw

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        image = self.ds.read_image(i)
        mask = read_mask(self.mask_dir / f"{self.ds[i].id}.png", num_classes=len(self.ds.classes))
        if self.flip[i]:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return to_tensor(image, self.mean, self.std), grid_labels(mask, len(self.ds.classes), self.cfg.min_share)


def train_affinity_head(backbone, ds: Dataset, mask_dir: Path, cfg: AffinityConfig, mean, std, device: torch.device,
                        out_dir: Path, seed: int = 0) -> dict:
    """Train an :class:`AffinityHead` on the confident pixels of ``mask_dir/<id>.png`` into ``out_dir``
    (``head.pt``, ``checkpoint.pt`` each epoch, ``log.csv``); resumes from ``checkpoint.pt``. Images
    without a labelled pair are skipped. Returns ``{"epochs", "seconds", "final_loss"}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.eval().to(device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    head = AffinityHead(backbone.level_channels, cfg.width, cfg.dim).to(device)
    opt = torch.optim.Adam([{"params": list(head.parameters()), "base_lr": cfg.lr}], lr=cfg.lr)
    offsets = pair_offsets(cfg.radius)
    data = AffinityData(ds, mask_dir, cfg, mean, std, seed)
    summary = fit(head, opt, data, lambda m, x, y: affinity_loss(embed(backbone, m, x), y[0], offsets), cfg, out_dir,
                  name="affinity", device=device, seed=seed, free={"epochs", "device"}, steps_per_epoch=len(ds),
                  batches=lambda epoch: [[int(i)] for i in data.order])
    save_checkpoint(out_dir / "head.pt", {"head": head.state_dict(), "level_channels": list(backbone.level_channels),
                                          "width": cfg.width, "dim": cfg.dim})
    rows = summary["history"]
    return {"epochs": cfg.epochs, "seconds": round(sum(r["seconds"] for r in rows), 1), "final_loss": rows[-1]["loss"] if rows else None}


def load_affinity_head(path: Path, device: torch.device) -> AffinityHead:
    ck = load_checkpoint(path)
    head = AffinityHead(ck["level_channels"], ck["width"], ck["dim"])
    head.load_state_dict(ck["head"])
    return head.to(device).eval()


def walk_maps(backbone, head: AffinityHead, ds: Dataset, cam_dir: Path, out_dir: Path, cfg: AffinityConfig, mean, std,
              device: torch.device) -> int:
    """Write ``out_dir/<id>.npz``, the random-walked maps of ``cam_dir/<id>.npz``, for every image of
    ``ds`` without one; returns how many were computed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, s in enumerate(ds) if not (out_dir / f"{s.id}.npz").is_file()]
    backbone.eval().to(device)
    for i in progress(todo, desc="affinity: random walk", unit="img"):
        s = ds[i]
        classes, cams = load_cam(cam_dir / f"{s.id}.npz", ds.num_classes)
        image = ds.read_image(i)
        if cams.shape[1:] != image.shape[:2]:
            raise DataError(f"maps are {cams.shape[1]}x{cams.shape[2]} but the image is {image.shape[0]}x{image.shape[1]}",
                            cam_dir / f"{s.id}.npz")
        with torch.no_grad():
            emb = embed(backbone, head, _input(image, mean, std, device)).cpu()
        save_cam(out_dir / f"{s.id}.npz", classes, refine_maps(cams, emb, cfg.radius, cfg.beta, cfg.steps, cfg.normalise))
    return len(todo)

