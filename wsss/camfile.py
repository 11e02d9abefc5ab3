"""The CAM file format shared by `wsss cam`, `wsss expand` and `wsss crf` (numpy only, no torch, so
CRF worker processes start fast).

``<id>.npz``: ``classes`` int16 ``(k,)`` class ids (1..K); ``cam`` float16 ``(k, H, W)`` in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss.errors import DataError
from wsss.io import atomic_path


def save_cam(path: str | Path, classes: np.ndarray, cam: np.ndarray) -> None:
    """Atomically write one image's maps: ``classes (k,)`` ids, ``cam (k, H, W)`` in [0, 1]."""
    classes = np.asarray(classes)
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise ValueError(f"cam must be (k, H, W) with k = {len(classes)}, got {cam.shape}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, classes=classes.astype(np.int16), cam=cam.astype(np.float16))


def load_cam(path: str | Path, num_classes: int | None = None,
             size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(classes (k,) int64, cam (k, H, W) float32)`` from a CAM ``.npz``, validating it (and, with
    ``size``, that ``(H, W)`` is its image's size)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            classes, cam = z["classes"].astype(np.int64), z["cam"].astype(np.float32)
    except FileNotFoundError:
        raise DataError("CAM file not found", path) from None
    except (KeyError, ValueError, OSError) as e:
        raise DataError(f"not a wsss CAM file ({type(e).__name__}: {e})", path) from None
    if cam.ndim != 3 or cam.shape[0] != len(classes):
        raise DataError(f"cam has shape {cam.shape} but {len(classes)} classes", path)
    if not np.isfinite(cam).all():
        raise DataError("cam contains NaN or infinite values", path)
    if cam.size and (cam.min() < 0 or cam.max() > 1.001):
        raise DataError(f"cam values must be in [0, 1], found {cam.min():.3g}..{cam.max():.3g}", path)
    if num_classes is not None and len(classes) and (classes.min() < 1 or classes.max() > num_classes):
        raise DataError(f"class ids {classes.tolist()} outside 1..{num_classes}", path)
    if size is not None and cam.shape[1:] != tuple(size):
        raise DataError(f"CAM size {cam.shape[1]}x{cam.shape[2]} differs from its image's {size[0]}x{size[1]}", path)
    return classes, cam
