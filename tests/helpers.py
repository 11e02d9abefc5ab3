"""Assertions shared by the test modules."""

from __future__ import annotations

import numpy as np
import torch


def assert_fp16_close(a: np.ndarray, b: np.ndarray, ulps: int = 1) -> None:
    """Assert two fp16-stored arrays (any float dtype, same shape) differ by at most ``ulps`` fp16 ulp.

    For maps written by different processes or thread counts: the float summation order changes with the
    thread count, so the last fp16 bit may differ; anything larger is a real difference."""
    a16, b16 = np.asarray(a, np.float16), np.asarray(b, np.float16)
    assert a16.shape == b16.shape, (a16.shape, b16.shape)
    tol = ulps * np.spacing(np.maximum(np.abs(a16), np.abs(b16))).astype(np.float32)
    diff = np.abs(a16.astype(np.float32) - b16.astype(np.float32))
    bad = diff > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.size} values differ by more than {ulps} fp16 ulp (max {diff.max():.3g})"


def tiny_cam_classifier():
    """A 4-class classifier on the tiny backbone (stride 8) in eval mode, its class weights drawn with
    std 0.5 from seed 0 so that every class has a non-trivial map."""
    from wsss.models import Classifier, create_backbone

    torch.manual_seed(0)
    m = Classifier(create_backbone("tiny", output_stride=8), 4).eval()
    torch.nn.init.normal_(m.classifier.weight, std=0.5)
    return m
