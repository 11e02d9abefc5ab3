"""File I/O: atomic writes, robust image/mask reading, palette PNGs, JSON.

Every writer goes through :func:`atomic_path`: data lands in a temporary file beside the target
and is renamed into place, so a killed process never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from wsss.errors import DataError, ImageReadError, WsssError, brief

IGNORE = 255

#: ``Image.MAX_IMAGE_PIXELS`` guards against decompression bombs; VOC/COCO photos are far below it.
Image.MAX_IMAGE_PIXELS = 200_000_000


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(n, 3)`` uint8; index 255 is the VOC 'ignore' cream colour."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    if n > IGNORE:
        pal[IGNORE] = (224, 224, 192)
    return pal


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    The temp name ends in ``.tmp``, never in the output's suffix, so a ``*.png`` listing of an output
    folder never picks up the half file a killed writer left behind; writers must name the format."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer's pid in the name lets remove_temp_files spare files other live processes are writing
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as e:
        raise WsssError(f"cannot write here ({e.strerror or brief(e)})", path.parent) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should be readable
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError):  # a full disk, a lost mount: name the file, no traceback
            raise WsssError(f"cannot write ({e.strerror or brief(e)})", path) from e
        raise


_WRITER_PID = re.compile(r"\.pid(\d+)\.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        pass
    return True


def remove_temp_files(folder: str | Path, recursive: bool = True) -> int:
    """Delete the temp files a killed writer left in ``folder`` (and its subfolders with ``recursive``; names made by
    :func:`atomic_path`, never outputs); returns how many. Files of a writer that is still running (another torchrun rank or
    worker process writing into the same folder) are left alone."""
    n = 0
    for tmp in (Path(folder).rglob if recursive else Path(folder).glob)(".*.tmp*"):
        pids = _WRITER_PID.findall(tmp.name)
        if pids and _alive(int(pids[-1])):
            continue
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", path) from None


def _to_rgb_uint8(img: Image.Image, path: Path) -> np.ndarray:
    """Convert any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) to ``(H, W, 3)`` uint8 RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit PNGs use the full 0..65535 range; 32-bit integer images are scaled by their own max.
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr = np.clip(arr * 255.0 / max(top, 1), 0, 255).round().astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max(initial=0.0)
        arr = arr / hi * 255.0 if hi > 1.0 else arr * 255.0
        return np.repeat(np.clip(arr, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels onto white rather than whatever colour hides behind alpha 0.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


def read_image(path: str | Path) -> np.ndarray:
    """Read a photo as ``(H, W, 3)`` uint8 RGB, applying its EXIF orientation.

    Grayscale, palette, RGBA, CMYK and 16-bit inputs are converted; a missing, empty, truncated or
    non-image file raises :class:`ImageReadError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError("image file not found", path)
    if path.stat().st_size == 0:
        raise ImageReadError("image file is empty (0 bytes)", path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.array(_to_rgb_uint8(img, path), order="C", copy=True)  # writable, owns its data
    except UnidentifiedImageError:
        raise ImageReadError("not a readable image (unknown or corrupt format)", path) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).strip() or type(e).__name__
        if "truncated" in msg.lower():
            msg = "image data is truncated"
        raise ImageReadError(f"cannot decode image ({msg})", path) from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image as displayed (after EXIF rotation), reading only its header."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ImageReadError("image file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageReadError("not a readable image (unknown or corrupt format)", path) from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def read_mask(path: str | Path, palette: np.ndarray | None = None, num_classes: int | None = None) -> np.ndarray:
    """Read a label mask as ``(H, W)`` uint8 class ids (255 = ignore).

    Accepts palette/grayscale PNGs (indices are the ids) and RGB colour-coded masks, which are mapped
    back to ids through ``palette`` (the VOC palette by default); an unknown colour is an error. With
    ``num_classes`` (background included), an id outside ``0..num_classes-1`` other than 255 is an error.
    """
    mask = _decode_mask(Path(path), palette)
    if num_classes is not None:
        bad = (mask >= num_classes) & (mask != IGNORE)
        if bad.any():
            raise DataError(f"class id {int(mask[bad][0])} outside 0..{num_classes - 1} (255 = ignore)", path)
    return mask


def _decode_mask(path: Path, palette: np.ndarray | None) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError("mask file not found", path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "L"):
                return np.array(img, dtype=np.uint8)
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.int64)
                if arr.max(initial=0) > 255:
                    raise ImageReadError(f"mask has id {int(arr.max())} > 255", path)
                return arr.astype(np.uint8)
            rgb = np.asarray(img.convert("RGB"))
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot decode mask ({str(e).strip() or type(e).__name__})", path) from None
    pal = voc_palette() if palette is None else palette
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    pal_key = (pal[:, 0].astype(np.int32) << 16) | (pal[:, 1].astype(np.int32) << 8) | pal[:, 2]
    order = np.argsort(pal_key, kind="stable")
    pos = np.clip(np.searchsorted(pal_key[order], key), 0, len(order) - 1)
    ids = order[pos]
    bad = pal_key[ids] != key
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise ImageReadError(f"RGB mask has colour {tuple(int(v) for v in rgb[y, x])} at (y={y}, x={x}) that is not in the palette", path)
    return ids.astype(np.uint8)


def write_palette_png(path: str | Path, mask: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Atomically write an ``(H, W)`` uint8 mask as a palette PNG (VOC colours, 255 = ignore)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    img = Image.fromarray(np.ascontiguousarray(mask.astype(np.uint8)), mode="P")
    pal = voc_palette() if palette is None else palette
    img.putpalette(pal.reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=False)


def write_image(path: str | Path, image: np.ndarray, quality: int = 92) -> None:
    """Atomically write an ``(H, W, 3)`` uint8 RGB image; format from the suffix (JPEG/PNG)."""
    fmt = "JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    img = Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    with atomic_path(path) as tmp:
        if fmt == "JPEG":
            img.save(tmp, format=fmt, quality=quality)
        else:
            img.save(tmp, format=fmt)


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file's bytes (keys outputs by the exact model file that made them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
