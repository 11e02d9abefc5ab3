"""Shared fixtures: tiny on-disk datasets built per test (no network, no shared data needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main as cli_main
from wsss.io import write_palette_png

os.environ.setdefault("WSSS_PROGRESS", "0")


def make_voc(root: Path, items: dict[str, tuple[str, tuple[int, int]]], classes=("cat", "dog"), split="train",
             masks: bool = True) -> Path:
    """Write a VOC-layout dataset: ``items = {id: (labels, (H, W))}``; images are random RGB JPEGs and
    masks mark a box of the first labelled class."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(["background", *classes]) + "\n")
    rows = ["image,labels"]
    for sid, (labels, (h, w)) in items.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{sid}.jpg")
        rows.append(f"{sid},{labels}")
        if masks:
            m = np.zeros((h, w), np.uint8)
            names = labels.split()
            if names and names[0] in classes:
                m[h // 4 : h // 2, w // 4 : w // 2] = classes.index(names[0]) + 1
            write_palette_png(root / "SegmentationClass" / f"{sid}.png", m)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(items) + "\n")
    return root


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "voc", {"a": ("cat", (40, 50)), "b": ("dog cat", (30, 30)), "c": ("dog", (64, 48))})


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Call ``wsss`` in-process: returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def jpeg_bytes(arr: np.ndarray, exif_orientation: int | None = None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    if exif_orientation is None:
        img.save(buf, format="JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()
