"""Paired image/mask transforms on numpy arrays.

Images are ``(H, W, 3)`` uint8 RGB, masks ``(H, W)`` uint8 ids (255 = ignore); both are checked at
entry. Masks are only ever resized with exact nearest neighbour (no new ids appear) and padded with
255, so padding is ignored by every loss and metric. Randomness comes from an explicit
``np.random.Generator`` so that a seed reproduces an epoch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from wsss.io import IGNORE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pair = tuple[np.ndarray, "np.ndarray | None"]


def check_pair(image: np.ndarray, mask: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` unless ``image`` is ``(H, W, 3)`` uint8 and ``mask`` is ``(H, W)`` uint8."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
        raise ValueError(f"image must be (H, W, 3) uint8, got {got[0]} {got[1]}")
    if mask is not None:
        if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"mask must be (H, W) uint8, got {getattr(mask, 'shape', None)} {getattr(mask, 'dtype', '')}")
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]) -> Pair:
    """Resize to ``size = (H, W)``: image bilinear (area when shrinking), mask exact nearest."""
    check_pair(image, mask)
    h, w = size
    if (h, w) == image.shape[:2]:
        return image.copy(), None if mask is None else mask.copy()
    interp = cv2.INTER_AREA if h * w < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
    img = cv2.resize(image, (w, h), interpolation=interp)
    msk = None if mask is None else cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return img, msk


def pad_pair(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int], fill: Sequence[int] = (0, 0, 0)) -> Pair:
    """Pad bottom/right up to at least ``size = (H, W)``; the mask is padded with 255 (ignore)."""
    h, w = image.shape[:2]
    ph, pw = max(size[0] - h, 0), max(size[1] - w, 0)
    if ph == 0 and pw == 0:
        return image, mask
    img = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=tuple(int(v) for v in fill))
    msk = None if mask is None else cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE)
    return img, msk


class Transform:
    """A paired transform: ``t(image, mask, rng) -> (image, mask)``; never modifies its inputs."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> Pair:
        check_pair(image, mask)
        return self.apply(image, mask, rng)

    def apply(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> Pair:
        raise NotImplementedError


@dataclass
class Resize(Transform):
    """Resize so that the longer side equals ``long_side`` (keeping aspect), or to a fixed ``(H, W)``."""

    long_side: int | None = None
    size: tuple[int, int] | None = None

    def apply(self, image, mask, rng):
        if self.size is not None:
            return resize_pair(image, mask, self.size)
        h, w = image.shape[:2]
        s = self.long_side / max(h, w)
        return resize_pair(image, mask, (max(1, round(h * s)), max(1, round(w * s))))


@dataclass
class RandomScale(Transform):
    """Rescale by a factor drawn uniformly from ``[low, high]``."""

    low: float = 0.5
    high: float = 1.5

    def apply(self, image, mask, rng):
        s = float(rng.uniform(self.low, self.high))
        h, w = image.shape[:2]
        return resize_pair(image, mask, (max(1, round(h * s)), max(1, round(w * s))))


@dataclass
class RandomCrop(Transform):
    """Crop ``(size, size)`` at a random place, padding first (image with ``fill``, mask with 255)."""

    size: int = 224
    fill: tuple[int, int, int] = (124, 116, 104)  # the ImageNet mean, so padding normalises to ~0

    def apply(self, image, mask, rng):
        image, mask = pad_pair(image, mask, (self.size, self.size), self.fill)
        h, w = image.shape[:2]
        y = int(rng.integers(0, h - self.size + 1))
        x = int(rng.integers(0, w - self.size + 1))
        img = image[y : y + self.size, x : x + self.size].copy()
        msk = None if mask is None else mask[y : y + self.size, x : x + self.size].copy()
        return img, msk


@dataclass
class HFlip(Transform):
    """Mirror left-right with probability ``p``."""

    p: float = 0.5

    def apply(self, image, mask, rng):
        if rng.random() >= self.p:
            return image.copy(), None if mask is None else mask.copy()
        return image[:, ::-1].copy(), None if mask is None else mask[:, ::-1].copy()


@dataclass
class ColorJitter(Transform):
    """Random brightness/contrast/saturation (factors in ``1 ± x``) and hue (``± hue`` of a turn). Image only."""

    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.0

    def apply(self, image, mask, rng):
        img = image.astype(np.float32)
        if self.brightness:
            img *= rng.uniform(1 - self.brightness, 1 + self.brightness)
        if self.contrast:
            mean = img.mean()
            img = (img - mean) * rng.uniform(1 - self.contrast, 1 + self.contrast) + mean
        if self.saturation:
            gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
            img = (img - gray[..., None]) * rng.uniform(1 - self.saturation, 1 + self.saturation) + gray[..., None]
        out = np.clip(img, 0, 255).astype(np.uint8)
        if self.hue:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            shift = int(round(rng.uniform(-self.hue, self.hue) * 180))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return out, None if mask is None else mask.copy()


class Compose(Transform):
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def apply(self, image, mask, rng):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask


def to_tensor(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """``(H, W, 3)`` uint8 -> normalised ``(3, H, W)`` float32 torch tensor."""
    import torch

    check_pair(image)
    arr = (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
