"""`wsss export`: ONNX (checked against PyTorch with onnxruntime, dynamic batch and size) and TorchScript."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort  # the export extra, part of dev
import pytest
import torch

from wsss.export import load_for_export
from wsss.models.checkpoint import save_checkpoint
from wsss.models.segmenter import create_segmenter

CLASSES = ["background", "cat", "dog"]


def _segmenter_file(tmp_path, arch="deeplabv3plus", **options):
    torch.manual_seed(0)
    model = create_segmenter(arch, 3, backbone="tiny", **options).eval()
    path = tmp_path / "run" / "seg" / "segmenter.pt"
    path.parent.mkdir(parents=True)
    meta = {"arch": arch, "spec": model.spec(), "num_classes": 3, "classes": CLASSES, "mean": list(model.mean),
            "std": list(model.std), "resize_long": None, "masks": "pseudo"}
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path


def _classifier_file(tmp_path):
    from wsss.models import Classifier, create_backbone

    torch.manual_seed(0)
    model = Classifier(create_backbone("tiny"), 2).eval()
    path = tmp_path / "run" / "cls" / "classifier.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": "tiny", "output_stride": 8, "num_classes": 2, "classes": CLASSES, "mean": list(model.backbone.mean),
            "std": list(model.backbone.std), "head": model.head_config()}
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path


@pytest.mark.parametrize("arch,options", [("deeplabv3plus", {"channels": 16}), ("unet", {}), ("fcn_skip", {})])
def test_onnx_segmenter_matches_pytorch_at_any_size(tmp_path, run_cli, arch, options):
    path = _segmenter_file(tmp_path, arch, **options)
    out = tmp_path / "seg.onnx"
    code, stdout, err = run_cli("export", tmp_path / "run", "--out", out)  # a run directory: RUN/seg/segmenter.pt
    assert code == 0, err
    assert "input 'image' float32 (B, 3, H, W)" in stdout and "classes background, cat, dog" in stdout
    wrapped, _ = load_for_export(path, "seg")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 80), (2, 3, 45, 71)]:  # not the traced size: the axes are dynamic
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = wrapped(x).numpy()
        (got,) = sess.run(None, {"image": x.numpy()})
        assert got.shape == ref.shape == (shape[0], 3, *shape[2:])
        assert np.abs(got - ref).max() <= 1e-4
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["kind"] == "seg"


def test_exported_graph_normalises_like_the_pipeline(tmp_path):
    """The graph takes pixels / 255: its logits equal the segmenter's on the normalised image."""
    path = _segmenter_file(tmp_path, "deeplabv3", channels=16)
    wrapped, meta = load_for_export(path, "seg")
    img = torch.rand(1, 3, 40, 40)
    mean, std = torch.tensor(meta["mean"]).view(1, 3, 1, 1), torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(wrapped(img), wrapped.model((img - mean) / std), atol=1e-6)


def test_onnx_classifier_gives_logits_and_cams(tmp_path, run_cli):
    path = _classifier_file(tmp_path)
    out = tmp_path / "cls.onnx"
    code, _, err = run_cli("export", path, "--what", "cls", "--out", out)
    assert code == 0, err
    wrapped, _ = load_for_export(path, "cls")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 56, 72)
    with torch.no_grad():
        ref_logits, ref_cams = (t.numpy() for t in wrapped(x))
    logits, cams = sess.run(None, {"image": x.numpy()})
    assert logits.shape == (3, 2) and cams.shape == ref_cams.shape == (3, 2, 7, 9)
    assert np.abs(logits - ref_logits).max() <= 1e-4 and np.abs(cams - ref_cams).max() <= 1e-4


def test_torchscript_export_runs_without_wsss_classes(tmp_path, run_cli):
    path = _segmenter_file(tmp_path, "deeplabv3", channels=16)
    out = tmp_path / "seg.ts"
    code, _, err = run_cli("export", tmp_path / "run", "--format", "torchscript", "--out", out)
    assert code == 0, err
    ts = torch.jit.load(str(out))
    wrapped, _ = load_for_export(path, "seg")
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.allclose(ts(x), wrapped(x), atol=1e-5)


def test_export_errors_are_one_line(tmp_path, run_cli):
    code, _, err = run_cli("export", tmp_path, "--out", tmp_path / "x.onnx")
    assert code == 1 and "no segmenter here" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    bad = tmp_path / "bad.pt"
    shutil.copyfile(_classifier_file(tmp_path), bad)
    code, _, err = run_cli("export", bad, "--out", tmp_path / "y.onnx")  # a classifier file exported as a segmenter
    assert code == 1 and "not a wsss segmenter file" in err


def test_readme_onnx_snippet_runs_as_written(tmp_path, run_cli, monkeypatch):
    """The README's "Deploy without wsss" code, run as printed (only the file names point at a tiny model)."""
    import re
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Deploy without wsss"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _segmenter_file(tmp_path, "deeplabv3", channels=16)
    assert run_cli("export", tmp_path / "run", "--out", tmp_path / "model.onnx")[0] == 0
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["classes"] == CLASSES and scope["mask"].shape == (30, 44)
