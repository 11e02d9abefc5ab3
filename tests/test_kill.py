"""Kill tests: `wsss run` on a small synthetic config, SIGKILLed in the middle of each stage at random
points, then re-run; the final pseudo-masks, predictions and metrics must be identical to an
uninterrupted run's (also the determinism check: every re-run is an independent run of the same seed),
and no temp file may survive. Slow (several full runs): `make test-slow`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

OVERRIDES = ["data.synth.n_train=120", "data.synth.n_val=30", "train_cls.epochs=3", "cam.scales=[1.0, 0.5]",
             "expand.enabled=true", "expand.epochs=1", "segmaps.enabled=true", "segmaps.epochs=2", "affinity.enabled=true",
             "affinity.epochs=2", "train_seg.epochs=3", "run.gallery_images=0"]

# stage -> (folder, files whose appearance marks "in the middle of it")
PROGRESS = {"data": ("data", ".synth.*/JPEGImages/*.jpg"), "train-cls": ("cls", "checkpoint.pt"), "cam": ("cam", "*.npz"),
            "expand": ("expand/round_1/cam", "*.npz"), "crf": ("crf", "*.png"),
            "seg-maps-train": ("segmaps/segmenter", "checkpoint.pt"), "seg-maps": ("segmaps/maps", "*.npz"),
            "affinity-train": ("affinity", "checkpoint.pt"), "affinity": ("affinity/maps", "*.npz"),
            "train-seg": ("seg", "checkpoint.pt"), "predict": ("predict/val", "*.png")}


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "wsss", "-q", "run", "configs/demo.yaml", f"run.out_dir={run_dir}", *OVERRIDES]


def _env() -> dict:
    return {**os.environ, "WSSS_PROGRESS": "0", "PYTHONHASHSEED": "0"}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def _finals(run_dir: Path) -> tuple[dict, dict, dict]:
    """Digests of the crf, seg-maps and affinity pseudo-masks, of the predictions, and the metrics."""
    metrics = json.loads((run_dir / "eval" / "summary.json").read_text())
    masks = {**_digest(run_dir / "crf"), **{f"{stage}/{k}": v for stage in ("segmaps", "affinity")
                                             for k, v in _digest(run_dir / stage / "masks").items()}}
    return masks, _digest(run_dir / "predict" / "val"), metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict, dict]:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(_cmd(run_dir), check=True, env=_env(), timeout=900, capture_output=True)
    finals = _finals(run_dir)
    assert len(finals[0]) == 3 * 120 and len(finals[1]) == 30
    return finals


@pytest.mark.parametrize("attempt", [0, 1])
@pytest.mark.parametrize("stage", list(PROGRESS))
def test_sigkill_mid_stage_then_rerun_gives_identical_masks(stage, attempt, reference, tmp_path):
    rng = np.random.default_rng([sum(map(ord, stage)), attempt])  # a different random point per attempt
    folder, pattern = PROGRESS[stage]
    run_dir = tmp_path / "run"
    need = 1 if pattern == "checkpoint.pt" else int(rng.integers(3, 25))
    proc = subprocess.Popen(_cmd(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list((run_dir / folder).glob(pattern))) >= need:
                # a random point inside the stage: per-image stages are already at a random file, and predict
                # (30 small photos) ends within a fraction of a second, so only training waits longer
                time.sleep(float(rng.uniform(0, 0.5 if pattern == "checkpoint.pt" else 0.02)))
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run finished before it could be killed in {stage}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "eval" / "manifest.json").exists()
    done = subprocess.run(_cmd(run_dir), env=_env(), timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    crf, pred, metrics = _finals(run_dir)
    assert crf == reference[0], f"pseudo-masks differ after a kill in {stage}"
    assert pred == reference[1], f"predictions differ after a kill in {stage}"
    assert metrics == reference[2], f"metrics differ after a kill in {stage}"
    leftovers = [*run_dir.rglob(".*.tmp*"), *(run_dir / "data").glob(".synth.*")]
    assert not leftovers, leftovers
