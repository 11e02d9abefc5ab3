"""CAM methods. Each maps a batch of images to raw (ReLU'd, un-normalised) class maps.

Base class :class:`CAMMethod` does the forward pass; a subclass overrides one hook:

* ``cam``: the classifier's own linear head applied before pooling (Zhou et al. 2016); no backward pass.
* gradient methods (``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam``, ``hirescam``): activations of
  a target layer and the gradients of each requested class score with respect to them, combined by
  pytorch-grad-cam's own ``get_cam_image`` for that method. We call that function directly and never
  its ``forward``, whose per-image min-max scaling would break WSSS thresholds.

All requested classes of a batch get their gradients in one batched backward pass
(``is_grads_batched``), not one backward per class.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from torch import nn

from wsss.errors import ConfigError
from wsss.models.classifier import Classifier
from wsss.registry import Registry

log = logging.getLogger(__name__)


class CAMMethod:
    """Base: ``method(x (B,3,H,W), classes (k,) long) -> raw maps (B, k, h, w) >= 0`` (float32)."""

    needs_grad = False

    def __init__(self, model: Classifier, target_layer: str = "features") -> None:
        self.model = model
        self.target_layer = target_layer

    def __call__(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        return self.maps(x, classes.to(x.device).long()).clamp_min_(0)

    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


CAM_METHODS: Registry[type[CAMMethod]] = Registry("CAM method")


def create_cam_method(name: str, model: Classifier, target_layer: str = "features") -> CAMMethod:
    """Instantiate a registered CAM method for ``model``."""
    cls = CAM_METHODS.get(name)
    if not cls.needs_grad and target_layer != "features":
        raise ConfigError(f"CAM method '{name}' works on the classifier features only (cam.target_layer=features)")
    return cls(model, target_layer)


@CAM_METHODS.register("cam")
class ClassActivationMap(CAMMethod):
    """CAM: the 1x1 classifier weights applied to the final features. One forward pass, no gradients."""

    @torch.no_grad()
    def maps(self, x, classes):
        return self.model.class_maps(self.model.forward_features(x), classes)


@contextlib.contextmanager
def capture_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record ``module``'s forward outputs while the block runs; the hook is always removed and errors
    propagate unchanged."""
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        yield store
    finally:
        handle.remove()


def tokens_to_grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A transformer block's tokens ``(B, N, C)`` -> ``(B, C, h, w)``: the leading ``N - h w`` tokens (class /
    register tokens) dropped, the patch tokens laid out row by row on the grid (pytorch-grad-cam's
    ``reshape_transform`` convention for ViTs)."""
    b, n, c = t.shape
    if n < h * w:
        raise ValueError(f"{n} tokens cannot fill a {h}x{w} patch grid")
    return t[:, n - h * w:].reshape(b, h, w, c).permute(0, 3, 1, 2)


class GradientCAM(CAMMethod):
    """Gradient-weighted methods; subclasses name the pytorch-grad-cam class whose maths they use."""

    needs_grad = True
    backend: type = GradCAM

    def __init__(self, model: Classifier, target_layer: str = "features") -> None:
        super().__init__(model, target_layer)
        if target_layer != "features":
            try:
                self.layer = model.get_submodule(target_layer)
            except AttributeError:
                raise ConfigError(f"cam.target_layer '{target_layer}' is not a module of the classifier "
                                  f"(e.g. features, backbone.layer3)") from None
        # Only get_cam_image is used: it needs no hooks or model. This subclass skips BaseCAM's
        # __init__ (which would hook the model) and its __del__ (which releases those hooks).
        hookless = type(f"Hookless{self.backend.__name__}", (self.backend,), {"__init__": lambda s: None, "__del__": lambda s: None})
        self._impl = hookless()

    def activations_and_grads(self, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations ``(B, C, h, w)`` and gradients ``(k, B, C, h, w)`` of each class score."""
        with torch.enable_grad():
            if self.target_layer == "features":
                with torch.no_grad():
                    feats = self.model.forward_features(x)
                act = feats.detach().requires_grad_(True)
                logits = self.model.forward_head(act)
            else:
                with capture_output(self.layer) as store:
                    logits = self.model(x.requires_grad_(False))
                act = store[0]
                if act.ndim == 3:  # a transformer block: tokens, laid out on the patch grid below
                    s = self.model.backbone.output_stride
                    grid = (-(-x.shape[-2] // s), -(-x.shape[-1] // s))
            k, b = len(classes), x.shape[0]
            onehot = torch.zeros(k, b, logits.shape[1], device=x.device, dtype=logits.dtype)
            onehot[torch.arange(k), :, classes] = 1.0
            try:
                (grads,) = torch.autograd.grad(logits, act, grad_outputs=onehot, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: fall back to one backward per class
                grads = torch.stack([torch.autograd.grad(logits, act, grad_outputs=g, retain_graph=True)[0] for g in onehot])
        if act.ndim == 3:
            act = tokens_to_grid(act, *grid)
            grads = torch.stack([tokens_to_grid(g, *grid) for g in grads])
        return act.detach(), grads.detach()

    def maps(self, x, classes):
        act, grads = self.activations_and_grads(x, classes)
        k, b = grads.shape[:2]
        a = act.float().cpu().numpy()
        a = np.broadcast_to(a[None], (k, *a.shape)).reshape(k * b, *a.shape[1:])
        g = grads.float().cpu().numpy().reshape(k * b, *grads.shape[2:])
        out = self._impl.get_cam_image(None, None, None, a, g, False)  # (k*B, h, w), all classes at once
        out = np.ascontiguousarray(out.reshape(k, b, *out.shape[1:]).transpose(1, 0, 2, 3), dtype=np.float32)
        return torch.from_numpy(out).to(x.device)


for _name, _backend in [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus), ("xgradcam", XGradCAM),
                        ("layercam", LayerCAM), ("hirescam", HiResCAM)]:
    CAM_METHODS.register(_name)(type(f"{_backend.__name__}Method", (GradientCAM,), {"backend": _backend,
                                     "__doc__": f"{_backend.__name__} (pytorch-grad-cam), raw maps."}))
