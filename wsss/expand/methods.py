"""CAM expansion methods (a registry). Each one changes how the classifier is fine-tuned so that its
maps cover whole objects, not only their most discriminative parts:

* ``erasing``: adversarial erasing (AE-PSL, Wei et al. 2017) -- erase what the current maps highlight
  in the training images, fine-tune on the erased images, extract new maps, merge; several rounds.
* ``hide_and_seek``: hide random grid patches of the training images (Singh & Lee 2017).
* ``acol``: a second head trained on features with the first head's region erased (Zhang et al. 2018).
* ``mixup``: mixup of images and labels with uncertainty regularisers (Mixup-CAM, Chang et al. 2020).
* ``equivariant``: the maps of a rescaled image must match the rescaled maps (SEAM's equivariant
  regularisation, Wang et al. 2020).
* ``multi_dilated``: extra dilated 3x3 heads, maps fused as rate-1 + mean of the dilated ones (multiple
  receptive fields, Wei et al. 2018).
* ``recam``: a head trained with softmax cross-entropy on CAM-weighted features; maps from that head
  (ReCAM, Chen et al. 2022).

Methods combine: the batch changes and regularisers of every selected method apply in one fine-tune,
ACoL sets the classifier head, and erasing wraps that fine-tune in rounds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsss.errors import ConfigError
from wsss.models.classifier import Classifier
from wsss.registry import Registry
from wsss.engine.classifier import TrainHooks


class ExpandMethod(TrainHooks):
    """Base: no batch change, no regulariser, plain head, no erasing rounds."""

    head: str = "gap"
    rounds: int = 0

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def head_options(self) -> dict:
        """Keyword arguments of ``create_classifier`` for this method's head."""
        return {}


EXPAND_METHODS: Registry[type[ExpandMethod]] = Registry("expansion method")


@EXPAND_METHODS.register("plain")
class PlainFinetune(ExpandMethod):
    """The control: the same fine-tuning epochs with no expansion, to compare methods at equal cost."""


def hide_patches(x: torch.Tensor, grid: int, prob: float, rng: np.random.Generator) -> torch.Tensor:
    """A copy of ``x (B, C, H, W)`` with each cell of a ``grid`` x ``grid`` partition set to 0 (the mean,
    after normalisation) with probability ``prob``, independently per image."""
    b, _, h, w = x.shape
    keep = torch.from_numpy(rng.random((b, 1, grid, grid)) >= prob).to(x.device, x.dtype)
    # cell edges by integer division so that sizes not divisible by the grid are fully covered
    rows = (torch.arange(h, device=x.device) * grid) // h
    cols = (torch.arange(w, device=x.device) * grid) // w
    return x * keep[:, :, rows][:, :, :, cols]


@EXPAND_METHODS.register("hide_and_seek")
class HideAndSeek(ExpandMethod):
    """Random grid patches hidden in every training batch (``expand.hide_and_seek.grid``, ``.prob``)."""

    def batch(self, x, y, rng):
        return hide_patches(x, self.cfg.hide_and_seek.grid, self.cfg.hide_and_seek.prob, rng), y


def mix_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: ``lam * x + (1 - lam) * x[perm]`` and the same mix of the labels ``y (B, K)``;
    ``lam ~ Beta(alpha, alpha)``. Returns new tensors and ``lam``."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm], lam


def pixel_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-pixel softmax over classes of ``maps (B, K, h, w)``."""
    logp = F.log_softmax(maps, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def concentration(feats: torch.Tensor, maps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean spread of the features around each present class's centre: for class ``k`` of an image
    (``y > 0``), pixel weights ``a = relu(map_k) / sum`` give a centre ``c = sum a f`` and the loss is
    ``sum a ||f - c||^2 / C``. Small when the pixels a class claims have similar features."""
    b, c = feats.shape[:2]
    a = F.relu(maps).flatten(2)  # (B, K, n)
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-6)
    f = feats.flatten(2)  # (B, C, n)
    centre = torch.einsum("bkn,bcn->bkc", a, f)
    sq = (f * f).sum(1)  # (B, n)
    spread = torch.einsum("bkn,bn->bk", a, sq) - (centre * centre).sum(-1)  # E||f||^2 - ||E f||^2
    present = (y > 0).to(feats.dtype)
    return (spread.clamp_min(0) * present).sum() / present.sum().clamp_min(1) / c


@EXPAND_METHODS.register("mixup")
class MixupCAM(ExpandMethod):
    """Mixup of images and labels; entropy and concentration regularisers on the class maps
    (``expand.mixup.alpha``, ``.entropy_weight``, ``.concentration_weight``)."""

    def batch(self, x, y, rng):
        x, y, _ = mix_batch(x, y, self.cfg.mixup.alpha, rng)
        return x, y

    def regulariser(self, model: Classifier, x, feats, y):
        m = self.cfg.mixup
        if not (m.entropy_weight or m.concentration_weight):
            return None
        maps = model.class_maps(feats)
        loss = feats.new_zeros(())
        if m.entropy_weight:
            loss = loss + m.entropy_weight * pixel_entropy(maps)
        if m.concentration_weight:
            loss = loss + m.concentration_weight * concentration(feats, maps, y)
        return loss


def max_normalised(maps: torch.Tensor) -> torch.Tensor:
    """``relu(maps) / max`` per image and class, ``(B, K, h, w)``."""
    m = F.relu(maps)
    return m / m.flatten(2).amax(-1)[..., None, None].clamp_min(1e-5)


def equivariance_loss(model: Classifier, x: torch.Tensor, feats: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale equivariance of the class maps (SEAM, Wang et al. 2020): the maps of ``x (B, 3, S, S)``
    rescaled by ``scale`` should equal the maps of ``x`` rescaled likewise. Mean L1 distance of the
    max-normalised maps of the classes present in ``y (B, K)``, plus the classification loss of the
    rescaled images (so that their maps stay class maps). ``feats``: the features of ``x``."""
    small = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    feats_s = model.forward_features(small)
    maps_s = model.class_maps(feats_s)
    maps = F.interpolate(model.class_maps(feats), size=maps_s.shape[-2:], mode="bilinear", align_corners=False)
    return map_distance(maps, maps_s, y) + F.multilabel_soft_margin_loss(model.forward_head(feats_s), y)


def map_distance(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the max-normalised maps ``a``, ``b`` ``(B, K, h, w)`` over the pixels
    of the classes present in ``y (B, K)``."""
    present = (y > 0).to(a.dtype)[..., None, None]
    diff = (max_normalised(a) - max_normalised(b)).abs() * present
    return diff.sum() / (present.sum() * a.shape[-2] * a.shape[-1]).clamp_min(1)


@EXPAND_METHODS.register("equivariant")
class Equivariant(ExpandMethod):
    """SEAM's equivariant regularisation: class maps of a rescaled image must equal the rescaled class
    maps (``expand.equivariant.scale``, ``.weight``)."""

    def regulariser(self, model: Classifier, x, feats, y):
        e = self.cfg.equivariant
        return e.weight * equivariance_loss(model, x, feats, y, e.scale)


@EXPAND_METHODS.register("acol")
class ACoL(ExpandMethod):
    """Two-head classifier with online complementary erasing (``expand.acol.threshold``)."""

    head = "acol"

    def head_options(self) -> dict:
        return {"acol_threshold": self.cfg.acol.threshold}


@EXPAND_METHODS.register("multi_dilated")
class MultiDilated(ExpandMethod):
    """Dilated 3x3 heads beside the 1x1 one (``expand.multi_dilated.rates``), each trained to classify."""

    head = "multi_dilated"

    def head_options(self) -> dict:
        return {"dilated_rates": list(self.cfg.multi_dilated.rates)}


@EXPAND_METHODS.register("recam")
class ReCAM(ExpandMethod):
    """ReCAM's re-activation head, trained by softmax cross-entropy on CAM-weighted features
    (``expand.recam.weight``)."""

    head = "recam"

    def regulariser(self, model: Classifier, x, feats, y):
        return self.cfg.recam.weight * model.recam_loss(feats, y)


@EXPAND_METHODS.register("erasing")
class AdversarialErasing(ExpandMethod):
    """Rounds of erase / fine-tune / re-extract / merge (``expand.erasing.*``); see the expand stage."""

    @property
    def rounds(self) -> int:  # type: ignore[override]
        return self.cfg.erasing.rounds


class Combined(TrainHooks):
    """Several methods at once: batch changes in order, regularisers summed."""

    def __init__(self, methods: list[ExpandMethod]) -> None:
        self.methods = methods
        heads = [m for m in methods if m.head != "gap"]
        if len(heads) > 1:
            raise ConfigError(f"expand.methods {', '.join(m.head for m in heads)} each need their own classifier head; pick one")
        self.head = heads[0].head if heads else "gap"
        self.head_kwargs = heads[0].head_options() if heads else {}
        self.rounds = max((m.rounds for m in methods), default=0)

    def batch(self, x, y, rng):
        for m in self.methods:
            x, y = m.batch(x, y, rng)
        return x, y

    def regulariser(self, model, x, feats, y):
        terms = [t for m in self.methods if (t := m.regulariser(model, x, feats, y)) is not None]
        return sum(terms) if terms else None


def create_expand_methods(names: list[str], cfg) -> Combined:
    """The methods named in ``expand.methods`` combined."""
    if len(set(names)) != len(names):
        raise ConfigError(f"expand.methods lists a method twice: {names}")
    return Combined([EXPAND_METHODS.get(n)(cfg) for n in names])
