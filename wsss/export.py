"""Export a trained segmenter or classifier for deployment without wsss: ONNX (dynamic batch and image
size, run with onnxruntime) or TorchScript.

The exported graph takes ``image``: float32 ``(B, 3, H, W)`` RGB in [0, 1] and applies the model's own
mean/std normalisation, so a user only scales pixels by 1/255. Outputs:

* segmenter: ``logits`` ``(B, K, H, W)`` (class ids = argmax over K; ``classes`` names them);
* classifier: ``logits`` ``(B, K)`` (sigmoid for class probabilities) and ``cams`` ``(B, K, h, w)``, the raw
  class activation maps on the feature grid.

ONNX files carry ``classes``, ``kind`` and ``wsss_version`` as metadata properties (JSON / text).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from wsss.errors import WsssError, brief
from wsss.io import atomic_path

log = logging.getLogger(__name__)

Kind = Literal["seg", "cls"]


class _Normalised(nn.Module):
    """``image (B, 3, H, W)`` in [0, 1] -> the wrapped model's outputs (normalisation inside the graph)."""

    def __init__(self, model: nn.Module, mean, std, kind: Kind) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor):
        x = (image - self.mean) / self.std
        if self.kind == "seg":
            return self.model(x)
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), self.model.class_maps(feats)


def find_model(source: str | Path, kind: Kind) -> Path:
    """The model file: ``source`` itself (a ``.pt``) or, in a run directory, ``seg/segmenter.pt`` /
    ``cls/classifier.pt``."""
    source = Path(source)
    if source.is_file():
        return source
    path = source / ("seg/segmenter.pt" if kind == "seg" else "cls/classifier.pt")
    if not path.is_file():
        raise WsssError(f"no {'segmenter' if kind == 'seg' else 'classifier'} here (expected {path}; train it first, "
                        f"or give the .pt file)", source)
    return path


def load_for_export(path: Path, kind: Kind) -> tuple[_Normalised, dict]:
    from wsss.models.checkpoint import load_classifier, load_segmenter

    model, meta = (load_segmenter if kind == "seg" else load_classifier)(path, "cpu")
    mean = meta.get("mean") or getattr(model, "mean", None) or model.backbone.mean
    std = meta.get("std") or getattr(model, "std", None) or model.backbone.std
    return _Normalised(model, mean, std, kind).eval(), meta


def export_model(source: str | Path, out: str | Path, kind: Kind = "seg", fmt: Literal["onnx", "torchscript"] = "onnx",
                 sample_size: tuple[int, int] = (64, 80)) -> dict:
    """Write ``out`` (atomically) and return ``{"file", "kind", "format", "classes", "outputs", "model"}``.

    ONNX goes through torch's ``torch.export``-based exporter (the maintained one; the TorchScript-based
    exporter is deprecated), with the batch, height and width dynamic. TorchScript uses ``torch.jit.trace``,
    which torch has deprecated too: prefer ONNX."""
    from wsss import __version__

    path = find_model(source, kind)
    wrapped, meta = load_for_export(path, kind)
    sample = torch.rand(1, 3, *sample_size)
    outputs = ["logits"] if kind == "seg" else ["logits", "cams"]
    out = Path(out)
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(wrapped, sample, check_trace=False)
            traced.save(str(tmp))
        else:
            dims = {0: torch.export.Dim("batch", max=1024), 2: torch.export.Dim("height", min=16, max=16384),
                    3: torch.export.Dim("width", min=16, max=16384)}
            chatter = io.StringIO()  # the exporter prints its progress: kept out of the user's stdout
            try:
                with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    program = torch.onnx.export(wrapped, (sample,), input_names=["image"], output_names=outputs,
                                                dynamic_shapes={"image": dims}, dynamo=True, verbose=False)
                program.save(str(tmp))
            except Exception as e:  # noqa: BLE001  (the exporter raises many types for unsupported ops)
                raise WsssError(f"ONNX export failed ({type(e).__name__}: {brief(e, 200)})", path) from None
            finally:
                log.debug("%s", chatter.getvalue())
            import onnx

            m = onnx.load(str(tmp))
            for key, value in {"classes": json.dumps(meta["classes"]), "kind": kind, "wsss_version": __version__}.items():
                m.metadata_props.add(key=key, value=value)
            onnx.save(m, str(tmp))
    log.debug("export: %s -> %s (%s, %s)", path, out, fmt, kind)
    return {"file": str(out), "kind": kind, "format": fmt, "classes": list(meta["classes"]), "outputs": outputs, "model": str(path)}
