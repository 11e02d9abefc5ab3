"""Any timm model as a backbone: ``timm:<model name>`` (``timm:resnet50``, ``timm:densenet121``,
``timm:convnext_tiny``, ``timm:hrnet_w18_small_v2``, ``timm:vit_small_patch16_224``, ...).

timm's ``features_only`` mode gives every family's intermediate feature maps as ``(B, C, h, w)`` (vision
transformers' patch tokens already reshaped to the grid), so one adapter covers them all; we use it
rather than writing per-family feature extractors. Output stride 8/16 is asked of timm where the
family can dilate (ResNet, EfficientNet, ConvNeXt, ...); the others keep their native stride, with a
warning. Weights are never downloaded at run time: ``pretrained`` is a local ``.pth`` / ``.safetensors``
/ ``.bin`` file, or ``true`` for a file already in timm's local caches (the Hugging Face hub cache, or
torch hub's checkpoints folder for the older URL weights).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss.errors import ConfigError, WsssError, brief
from wsss.models.backbones import BACKBONES, Backbone

log = logging.getLogger(__name__)

#: families that take any input size only when built with ``dynamic_img_size`` (patch-grid models)
_DYNAMIC_SIZE_PREFIXES = ("vit_", "deit", "eva", "beit", "flexivit")
#: families whose streams are fused by fixed-factor upsampling: the input is padded to a multiple of this
_PAD_TO = {"hrnet": 32}


def check_timm_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a timm model (with or without a ``.tag``)."""
    import timm

    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else \
            " (see timm.list_models() for the names)"
        raise ConfigError(f"unknown timm model '{name}'{hint}")


def cached_weights_file(name: str) -> Path | None:
    """The ImageNet weights of timm model ``name`` if timm's local caches hold them, else None.
    Looks in the Hugging Face hub cache (``HF_HUB_CACHE``) and torch hub's ``checkpoints`` folder."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
            if fname:
                hit = try_to_load_from_cache(hub_id, fname)
                if isinstance(hit, str):
                    return Path(hit)
    url = getattr(cfg, "url", None)
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if cached.is_file():
            return cached
    return None


def _missing_weights_message(name: str) -> str:
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    where = []
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        where.append(f"{constants.HF_HUB_CACHE}/models--{cfg.hf_hub_id.replace('/', '--')}")
    if cfg is not None and getattr(cfg, "url", None):
        where.append(str(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)))
    if not where:
        return f"timm model '{name}' has no ImageNet weights; set pretrained to a local .pth/.safetensors file or false"
    return (f"ImageNet weights for timm:{name} are not in the local cache ({' or '.join(where)}); on a machine with "
            f"internet run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy that "
            f"folder here, or set pretrained to a local .pth/.safetensors file")


def _share_loaded(net: nn.Module, file_sd: dict[str, torch.Tensor]) -> float:
    """Share of ``net``'s parameter elements equal to a same-shaped tensor of ``file_sd`` (whatever the
    names: timm remaps keys for some families)."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for v in file_sd.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            by_shape.setdefault(tuple(v.shape), []).append(v)
    total = found = 0
    for p in net.parameters():
        total += p.numel()
        if any(torch.equal(p.detach(), v.to(p.dtype)) for v in by_shape.get(tuple(p.shape), ())):
            found += p.numel()
    return found / max(total, 1)


class TimmBackbone(Backbone):
    """A timm model's ``features_only`` network: ``forward(x (B, 3, H, W)) -> (B, C, H/s, W/s)`` (its last
    level); ``forward_levels`` gives its levels from stride 4 on (stride-2 levels are left out)."""

    def __init__(self, name: str, output_stride: int = 16, pretrained_file: str | Path | None = None) -> None:
        super().__init__()
        import timm

        kw: dict = {"features_only": True}
        if pretrained_file is not None:
            kw.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
        arch = name.split(".")[0]
        if arch.startswith(_DYNAMIC_SIZE_PREFIXES):
            kw.update(dynamic_img_size=True, dynamic_img_pad=True)  # any size: padded to whole patches
        try:
            net = timm.create_model(name, output_stride=output_stride, **kw) if output_stride != 32 else None
        except (TypeError, ValueError, AssertionError, NotImplementedError):
            net = None
        if net is None:
            net = timm.create_model(name, **kw)
        self.net = net
        info = net.feature_info
        reductions = list(info.reduction())
        self._keep = [i for i, r in enumerate(reductions) if r >= 4] or [len(reductions) - 1]
        self.level_channels = tuple(info.channels()[i] for i in self._keep)
        self.level_strides = tuple(reductions[i] for i in self._keep)
        self.out_channels = self.level_channels[-1]
        self.output_stride = self.level_strides[-1]
        if self.output_stride != output_stride:
            log.warning("backbone timm:%s: output stride %d (asked %d: this family cannot dilate)", name,
                        self.output_stride, output_stride)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", self.mean))
        self.std = tuple(cfg.get("std", self.std))
        self.name = f"timm:{name}"
        self._first_level = info.module_name()[self._keep[0]]
        self.pad_to = next((m for prefix, m in _PAD_TO.items() if arch.startswith(prefix)), 1)

    def stem_modules(self) -> list[nn.Module]:
        """What a "freeze stem" option freezes: the layers before the stride-4 level (a ViT: the patch
        embedding)."""
        inner = getattr(self.net, "model", None)
        if inner is not None and hasattr(inner, "patch_embed"):
            return [inner.patch_embed]
        first = self._first_level.replace(".", "_")
        children = list(self.net.named_children())
        for i, (child_name, _) in enumerate(children):
            if first == child_name or first.startswith(child_name + "_") or self._first_level.startswith(child_name + "."):
                return [c for _, c in children[:i]]
        # the level's module is not a child (e.g. HRNet's): the leading single layers
        stem = []
        for _, child in children:
            if next(child.children(), None) is not None:
                break
            stem.append(child)
        return stem

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = -h % self.pad_to, -w % self.pad_to
        feats = self.net(F.pad(x, (0, pw, 0, ph)) if ph or pw else x)
        levels = [feats[i] for i in self._keep]
        if ph or pw:  # back to the grid of the unpadded input
            levels = [f[..., :math.ceil(h / s), :math.ceil(w / s)] for f, s in zip(levels, self.level_strides)]
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_levels(x)[-1]


def _create(name: str, pretrained: bool | str = False, output_stride: int = 16) -> TimmBackbone:
    if pretrained is True:
        file = cached_weights_file(name)
        if file is None:
            raise WsssError(_missing_weights_message(name))
    elif pretrained:
        file = Path(pretrained)
        if not file.is_file():
            raise WsssError(f"weights file for timm:{name} not found", file)
    else:
        return TimmBackbone(name, output_stride)
    try:
        net = TimmBackbone(name, output_stride, pretrained_file=file)
    except (RuntimeError, KeyError, OSError, ValueError) as e:
        raise WsssError(f"weights do not fit timm:{name} ({brief(e, 160)})", file) from None
    from timm.models import load_state_dict

    share = _share_loaded(net, load_state_dict(str(file)))
    if share < 0.9:  # timm loads feature networks non-strictly: a wrong file would leave random weights
        raise WsssError(f"weights do not fit timm:{name}: only {100 * share:.0f}% of its weights were found in the file", file)
    return net


BACKBONES.register_prefix("timm:", _create, check_timm_name, "any timm model")
