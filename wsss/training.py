"""Pieces shared by the training stages (classifier, segmenter): device choice, poly learning rate,
memory layout, checkpoint files and the per-epoch CSV log."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from wsss.errors import WsssError, brief
from wsss.io import atomic_path, write_text


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise WsssError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsssError(f"device '{name}' requested but CUDA is not available")
    return dev


def poly_lr(base: float, it: int, max_it: int, warmup: int = 0, power: float = 0.9) -> float:
    """Learning rate at iteration ``it``: linear warm-up, then ``base * (1 - it/max_it) ** power``."""
    if it < warmup:
        return base * (it + 1) / warmup
    return base * (1 - min(it, max_it - 1) / max_it) ** power


def memory_layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` through a temp file + rename: a killed run never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by wsss (``weights_only=True``: no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise WsssError("checkpoint not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WsssError(f"cannot load checkpoint ({type(e).__name__}: {brief(e, 120)})", path) from None


def write_log_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per epoch; the columns are the union of the rows' keys, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def freeze_parameters(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def set_train_mode(model: torch.nn.Module, backbone: torch.nn.Module, stem: list[torch.nn.Module],
                   freeze_bn: bool, freeze_stem: bool) -> None:
    """``model.train()``, except the backbone's batch norms with ``freeze_bn`` (statistics and affine
    parameters fixed) and the ``stem`` modules with ``freeze_stem``."""
    model.train()
    if freeze_bn:
        bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.eval()
        freeze_parameters(bns)
    if freeze_stem:
        for m in stem:
            m.eval()


def make_optimizer(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over parameter ``groups``, from a training config section."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_resumable(checkpoint: dict[str, Any], current: dict[str, Any], section: str, free: set[str], path: Path) -> None:
    """Refuse to resume when a setting outside ``free`` differs from the checkpoint's config."""
    saved = checkpoint.get("config", {})
    changed = sorted(k for k, v in current.items() if k not in free and saved.get(k) != v)
    if changed:
        raise WsssError(f"cannot resume: {section}.{f', {section}.'.join(changed)} differ from the checkpoint's "
                        f"(use --no-resume or --force to start over)", path)
