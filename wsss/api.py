"""The public Python API, for notebooks and scripts (exported at the package top level)::

    import wsss
    cfg = wsss.load_config("configs/demo.yaml", overrides=["run.out_dir=runs/nb"])
    result = wsss.run(cfg)                      # or stages="cam", stages=("crf", "train-seg")
    result.report["metrics"]["seg"]["mIoU"]     # the numbers the CLI prints

    seg = wsss.Segmenter.load("runs/nb/seg/segmenter.pt")
    mask = seg.predict("photo.jpg")             # (H, W) uint8 class ids; seg.classes names them
    probs = seg.predict_proba(image_array)      # (K, H, W) float32
    cams = wsss.Classifier.load("runs/nb/cls/classifier.pt").cams(pil_image, classes=["dog"])

Images may be a path, a PIL image or a numpy array (uint8 0-255 or float 0-1; gray, RGB or RGBA); a
list of them is processed in batches of ``batch_size`` same-size images and gives a list back. The
library logs (``logging``) and never prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np

from wsss.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from wsss.config import Config
    from wsss.pipeline.runner import RunResult

ImageLike = Union[str, Path, "Image.Image", np.ndarray]

FLOWS = ("standard", "fully-supervised", "self-training", "ablation")


def load_config(source: "str | Path | Mapping[str, Any] | Config | None" = None, overrides: Sequence[str] = ()) -> "Config":
    """A validated :class:`~wsss.config.Config` from a YAML path, a dict of sections (as the YAML would
    hold), an existing config, or the defaults (None); ``overrides`` are ``"section.key=value"`` strings as
    on the command line. Raises :class:`~wsss.errors.ConfigError` naming the bad key."""
    from wsss.config import Config, apply_overrides, config_from_dict, config_to_dict
    from wsss.config import load_config as load_yaml

    if isinstance(source, Config):
        source = config_to_dict(source)
    if isinstance(source, Mapping):
        given = {item.partition("=")[0].strip(): item for item in overrides}
        return config_from_dict(apply_overrides(dict(source), overrides), overrides=given)
    return load_yaml(source, overrides)


def run(config: "Config | str | Path | Mapping[str, Any]", stages: str | Sequence[str] | None = None, *,
        flow: str = "standard", force: Sequence[str] = ()) -> "RunResult":
    """Run a flow into ``config.run.out_dir`` with the CLI's caching (a stage whose inputs and settings are
    unchanged is skipped). ``stages``: None (all), one stage name, or consecutive stage names (the first
    to the last are run, as ``wsss run --from A --to B``); standard flow only. ``force``: stages to redo
    (and everything after them; the ablation flow: ``("ablation",)`` discards its earlier results). Returns the run's :class:`~wsss.pipeline.runner.RunResult`: ``report``
    holds the metrics the CLI prints, ``done`` the (stage, seconds, skipped) rows."""
    cfg = config if not isinstance(config, (str, Path, Mapping)) else load_config(config)
    if flow not in FLOWS:
        raise ConfigError(f"unknown flow '{flow}' (flows: {', '.join(FLOWS)})")
    from wsss.pipeline.table import STAGE_NAMES

    names = [stages] if isinstance(stages, str) else list(stages or [])
    valid_force = ("ablation",) if flow == "ablation" else STAGE_NAMES
    for s in names:
        if s not in STAGE_NAMES:
            raise ConfigError(f"unknown stage '{s}' (stages: {', '.join(STAGE_NAMES)})")
    for s in force:
        if s not in valid_force:
            raise ConfigError(f"unknown stage '{s}' for the {flow} flow (stages: {', '.join(valid_force)})")
    if names and flow != "standard":
        raise ConfigError("stages= applies to the standard flow only")
    if len(names) > 1 and [STAGE_NAMES.index(s) for s in names] != list(range(STAGE_NAMES.index(names[0]),
                                                                             STAGE_NAMES.index(names[0]) + len(names))):
        raise ConfigError(f"stages must be consecutive in the pipeline order ({', '.join(STAGE_NAMES)}), got {', '.join(names)}")
    if flow == "fully-supervised":
        from wsss.pipelines import fully_supervised

        return fully_supervised.run(cfg, tuple(force))
    if flow == "self-training":
        from wsss.pipelines import self_training

        return self_training.run(cfg, tuple(force))
    if flow == "ablation":
        from wsss.pipelines import ablation

        return ablation.run(cfg, force=bool(force))
    from wsss.pipelines import standard

    return standard.run(cfg, names[0] if names else None, names[-1] if names else None, tuple(force))


def as_rgb(image: ImageLike) -> np.ndarray:
    """Any supported image as ``(H, W, 3)`` uint8 RGB (a new array; the input is not modified).

    Paths are read with EXIF orientation applied; PIL images of any mode are converted (transparent
    pixels composited on white); arrays may be ``(H, W)`` / ``(H, W, 1)`` gray, ``(H, W, 3)`` RGB or
    ``(H, W, 4)`` RGBA, uint8 (0-255) or float (0-1)."""
    from PIL import Image

    from wsss.io import _to_rgb_uint8, read_image

    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.array(_to_rgb_uint8(image, Path("<PIL image>")), order="C", copy=True)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    if a.dtype == np.uint8:
        a = a.copy()
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError("float image arrays must hold values in [0, 1] (uint8 arrays: 0-255)")
        a = np.round(a * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"image arrays must be uint8 (0-255) or float (0-1), got {a.dtype}")
    if a.ndim == 2 or a.shape[2] == 4:  # gray / RGBA: the same conversion as image files (alpha over white)
        return np.array(_to_rgb_uint8(Image.fromarray(a), Path("<array>")), order="C", copy=True)
    return np.ascontiguousarray(a)


def _batches(images: list[np.ndarray], batch_size: int):
    """Indices of same-size images, at most ``batch_size`` per group, in input order within a group."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for idx in groups.values():
        for k in range(0, len(idx), batch_size):
            yield idx[k:k + batch_size]


@dataclass
class _Trained:
    """A trained model file loaded for use: ``model`` in eval mode, its ``meta``, the ``device`` it runs on."""

    model: Any
    meta: dict
    device: str = "cpu"
    _loader = ""  # the wsss.models.checkpoint function that rebuilds this kind of file

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu"):
        """Rebuild the model saved at ``path``; ``device``: auto, cpu, cuda or cuda:N."""
        from wsss.engine.core import resolve_device
        from wsss.models import checkpoint

        dev = str(resolve_device(device))
        model, meta = getattr(checkpoint, cls._loader)(path, dev)
        return cls(model, meta, dev)

    @property
    def classes(self) -> list[str]:
        """The class names by id, background (0) first."""
        return list(self.meta["classes"])


class Segmenter(_Trained):
    """A trained segmenter (``segmenter.pt``)."""

    _loader = "load_segmenter"

    def predict_proba(self, image: ImageLike | Sequence[ImageLike], *, scales: Sequence[float] = (1.0,), flip: bool = True,
                      batch_size: int = 4) -> np.ndarray | list[np.ndarray]:
        """Class probabilities ``(K, H, W)`` float32 at the image's resolution (a list for a list), averaged
        over ``scales`` (relative to the training ``resize_long``) and mirroring."""
        from wsss.inference import predict_probs

        single = not isinstance(image, (list, tuple))
        rgb = [as_rgb(im) for im in ([image] if single else image)]
        out: list[np.ndarray | None] = [None] * len(rgb)
        for idx in _batches(rgb, batch_size):
            probs = predict_probs(self.model, [rgb[i] for i in idx], scales, flip, self.meta.get("resize_long"), self.device)
            for i, p in zip(idx, probs):
                out[i] = p
        return out[0] if single else out

    def predict(self, image: ImageLike | Sequence[ImageLike], *, scales: Sequence[float] = (1.0,), flip: bool = True,
                crf: bool = False, exclusive_below: float | None = None, batch_size: int = 4) -> np.ndarray | list[np.ndarray]:
        """Class ids ``(H, W)`` uint8 (a list for a list); ``crf``: refine with the dense CRF first (its
        default kernels); ``exclusive_below``: class exclusion by the training labels' co-occurrence first
        (``predict.exclusive_below``; :func:`wsss.inference.exclusive_classes`)."""
        probs = self.predict_proba(image, scales=scales, flip=flip, batch_size=batch_size)
        single = not isinstance(image, (list, tuple))
        plist = [probs] if single else probs
        if exclusive_below is not None:
            from wsss.inference import exclude_classes, stored_cooccurrence

            counts = stored_cooccurrence(self.meta)
            plist = [exclude_classes(p, counts, exclusive_below) for p in plist]
        if crf:
            from wsss.config import CrfConfig
            from wsss.inference import refine_with_crf

            ims = [as_rgb(im) for im in ([image] if single else image)]
            plist = [refine_with_crf(im, p, CrfConfig()) for im, p in zip(ims, plist)]
        masks = [p.argmax(0).astype(np.uint8) for p in plist]
        return masks[0] if single else masks


class Classifier(_Trained):
    """A trained multi-label CAM classifier (``classifier.pt``)."""

    _loader = "load_classifier"

    def scores(self, image: ImageLike) -> dict[str, float]:
        """Image-level class probabilities (sigmoid of the logits), by class name."""
        import torch

        from wsss.cam.extract import _normalise

        x = _normalise(as_rgb(image), self.model.backbone.mean, self.model.backbone.std)[None].to(self.device)
        with torch.no_grad():
            p = torch.sigmoid(self.model(x))[0].cpu().numpy()
        return {name: float(v) for name, v in zip(self.classes[1:], p)}

    def cams(self, image: ImageLike, classes: Sequence[str | int] | None = None, *, method: str = "cam",
             scales: Sequence[float] = (1.0,), flip: bool = True) -> dict[str, np.ndarray]:
        """Class activation maps ``{class name: (H, W) float32 in [0, 1]}`` at the image's resolution, each
        divided by its maximum (as the pipeline stores them). ``classes``: names or class ids (>= 1);
        default every foreground class. ``method``: a registered CAM method (``wsss.cam.CAM_METHODS``)."""
        from wsss.cam.extract import extract_cams
        from wsss.cam.methods import create_cam_method

        names = self.classes
        if classes is None:
            ids = list(range(1, len(names)))
        else:
            ids = []
            for c in classes:
                if isinstance(c, str):
                    if c not in names[1:]:
                        raise ValueError(f"unknown class '{c}' (classes: {', '.join(names[1:])})")
                    ids.append(names.index(c))
                elif isinstance(c, (int, np.integer)) and 1 <= int(c) < len(names):
                    ids.append(int(c))
                else:
                    raise ValueError(f"class ids are 1..{len(names) - 1} (0 is background), got {c!r}")
        rgb = as_rgb(image)
        method_ = create_cam_method(method, self.model)
        ((_, cl, maps),) = list(extract_cams(method_, [("image", rgb, ids)], mean=self.model.backbone.mean,
                                             std=self.model.backbone.std, scales=scales, flip=flip, device=self.device))
        return {names[int(c)]: m for c, m in zip(cl, maps)}
