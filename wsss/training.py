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
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
            raise WsssError(f"cannot write the checkpoint ({brief(e)})", path) from e


def load_checkpoint(path: str | Path, hint: str = "") -> dict[str, Any]:
    """Load a checkpoint written by wsss (``weights_only=True``: no code is executed); ``hint`` is added
    to the error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise WsssError("checkpoint not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WsssError(f"cannot load checkpoint ({type(e).__name__}: {brief(e, 120)}){hint}", path) from None


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


#: added to the errors about an interrupted run's checkpoint
START_OVER = " (use --no-resume or --force to start over)"


def check_resumable(checkpoint: dict[str, Any], current: dict[str, Any], section: str, free: set[str], path: Path) -> None:
    """Refuse to resume when a setting outside ``free`` differs from the checkpoint's config."""
    saved = checkpoint.get("config", {})
    changed = sorted(k for k, v in current.items() if k not in free and saved.get(k) != v)
    if changed:
        raise WsssError(f"cannot resume: {section}.{f', {section}.'.join(changed)} differ from the checkpoint's{START_OVER}", path)


# --------------------------------------------------------------------------------------------------
# distributed training (torchrun): PyTorch's DistributedDataParallel, gloo on CPU, nccl on CUDA


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def init_distributed(device_name: str = "auto") -> bool:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl for CUDA, else gloo); ranks other
    than 0 log warnings only. Returns whether this call started the group."""
    import logging
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    dev = resolve_device(device_name)
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger("wsss").setLevel(logging.WARNING)
    return True


def rank_device(device: torch.device) -> torch.device:
    """This rank's GPU under torchrun (``LOCAL_RANK``), else ``device``."""
    import os

    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def rank_batches(n: int, batch_size: int, seed: int, drop_last: bool) -> list[list[int]]:
    """This rank's share of every global batch of an epoch: the epoch's shuffle of ``range(n)`` (the
    same permutation a one-process ``DataLoader(shuffle=True)`` with a generator seeded by ``seed`` makes)
    cut into global batches of ``batch_size``, each split evenly across the ranks. So N processes see
    exactly the global batches one process would, ``batch_size / N`` samples each."""
    rank, size = world()
    if batch_size % size:
        raise WsssError(f"batch_size {batch_size} is not divisible by the {size} processes (the global batch is split evenly)")
    gen = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=gen)  # the DataLoader draws a worker seed first
    perm = torch.randperm(n, generator=gen).tolist()
    out = []
    for start in range(0, n, batch_size):
        chunk = perm[start : start + batch_size]
        if len(chunk) < batch_size and (drop_last or len(chunk) < size):
            break
        out.append(chunk[rank::size])
    return out


class LossModule(torch.nn.Module):
    """``forward(x, y) -> loss_fn(model, x, y)``: lets DistributedDataParallel wrap the whole loss
    computation, whichever of the model's methods it calls."""

    def __init__(self, model: torch.nn.Module, loss_fn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, x, y)


def distributed_loss(model: torch.nn.Module, loss_fn, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """``LossModule(model, loss_fn)``, wrapped in DistributedDataParallel under torchrun (with
    SyncBatchNorm when asked: CUDA only)."""
    if world()[1] <= 1:
        return LossModule(model, loss_fn)
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        if device.type != "cuda":
            raise WsssError("sync_bn needs CUDA (torch's SyncBatchNorm does not run on CPU)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    module = LossModule(model, loss_fn)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (itself in one process)."""
    if world()[1] <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def reduce_sum(total: float, n: int, device: torch.device) -> tuple[float, int]:
    """Sums of ``total`` and ``n`` over the ranks (themselves in one process)."""
    if world()[1] <= 1:
        return total, n
    import torch.distributed as dist

    t = torch.tensor([total, float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]), int(t[1])
