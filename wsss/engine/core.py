"""The training engine: :func:`fit`, the one epoch loop every trained network goes through (the
classifier, its expansion fine-tunes, the affinity head, the segmenter), and what it stands on: device
choice, poly learning rate, optimisers, resumable checkpoints, the per-epoch ``log.csv`` and
DistributedDataParallel under torchrun."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from wsss.errors import WsssError
from wsss.io import write_text
from wsss.log import progress
from wsss.models.checkpoint import freeze_parameters, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

__all__ = ["START_OVER", "autocast", "averaged_weights", "barrier", "broadcast_int", "check_resumable", "distributed_loss", "fit",
           "freeze_parameters", "init_distributed", "is_main", "load_checkpoint", "make_ema", "make_optimizer", "memory_layout",
           "poly_lr", "rank_batches", "rank_device", "reduce_sum", "resolve_device", "save_checkpoint", "set_train_mode",
           "start_training", "world", "write_log_csv"]


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


def autocast(device: torch.device, amp: str):
    """Mixed-precision context: ``bf16`` on CUDA or CPU, ``fp16`` on CUDA; a no-op for ``none`` and for
    ``fp16`` on CPU (CPUs have no fast fp16 path). On CPU, bf16 is fast only where the CPU computes it
    natively (AVX512-BF16 or AMX); elsewhere it is emulated and slower than float32."""
    if amp == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def start_training(cfg: Any, out_dir: Path, seed: int) -> torch.device:
    """Before building a network to train: ``out_dir`` made and rid of a killed run's temp files, the
    section ``cfg`` saved there as ``config.yaml``, torch's threads (``cfg.threads``) and seed set.
    Returns this rank's device."""
    from wsss.config import save_config
    from wsss.io import remove_temp_files

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    device = rank_device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    return device


def make_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """torch's exponential moving average of ``model``'s parameters and buffers (``decay`` per
    optimiser step), or None for ``decay`` 0."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@contextmanager
def averaged_weights(model: torch.nn.Module, ema: torch.optim.swa_utils.AveragedModel | None):
    """Inside: ``model`` holds the averaged weights of ``ema``; its own are back afterwards."""
    if ema is None:
        yield
        return
    own = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema.module.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.utils.data.Dataset,
        loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | None], cfg: Any, out_dir: Path, *,
        name: str, device: torch.device, steps_per_epoch: int, batches: Callable[[int], Iterable[list[int]]],
        resume: bool = True, free: Iterable[str] = (), section: str = "", meta: Mapping[str, Any] | None = None,
        layout: torch.memory_format = torch.contiguous_format, amp: str = "none", warmup: int = 0,
        train_mode: Callable[[], None] | None = None, batch_hook: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        evaluate: Callable[[int], Mapping[str, Any]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs into ``out_dir`` (``checkpoint.pt`` and ``log.csv`` each epoch).

    ``data[i] -> (x, y)`` with a settable ``epoch``; ``batches(epoch)`` gives this rank's index lists of the
    epoch; ``loss_fn(model, x, y)`` returns the loss of a batch, or None to skip it (the iteration still
    counts for the poly schedule of every param group's ``base_lr``). ``batch_hook(x, y, rng)`` may change a
    batch first; ``evaluate(epoch)`` adds fields to the epoch's log row (rank 0 only). With ``resume`` an
    existing checkpoint whose ``cfg`` differs only in ``free`` fields is continued, torch's RNG included,
    so a resumed run ends with the weights of an uninterrupted one. Under torchrun the loss runs in
    DistributedDataParallel and rank 0 checkpoints and logs. With ``cfg.ema_decay`` > 0 an exponential
    moving average of the weights follows every step; ``evaluate`` sees it, and ``model`` holds it when
    ``fit`` returns (the checkpoint keeps both, so a resumed run averages the same). Returns ``{"epochs",
    "iterations", "final", "history"}``; saving the final model file is the caller's.
    """
    from wsss.config import config_to_dict

    ckpt_path = out_dir / "checkpoint.pt"
    settings = config_to_dict(cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.type == "cuda")
    start_epoch, it, history = 0, 0, []
    ema = make_ema(model, getattr(cfg, "ema_decay", 0.0))
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, START_OVER)
        check_resumable(ck, settings, section or name, set(free), ckpt_path)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck.get("scaler", {}) or scaler.state_dict())
        if "rng" in ck:
            torch.set_rng_state(ck["rng"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start_epoch, it, history = ck["epoch"], ck["iteration"], list(ck["history"])
        log.info("%s: resumed from %s at epoch %d", name, ckpt_path, start_epoch)
    max_it = steps_per_epoch * cfg.epochs
    step = distributed_loss(model, loss_fn, device, getattr(cfg, "sync_bn", False))
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        data.epoch = epoch
        loader = torch.utils.data.DataLoader(data, batch_sampler=list(batches(epoch)), num_workers=getattr(cfg, "workers", 0))
        (train_mode or model.train)()
        total, n = 0.0, 0
        bar = progress(loader, desc=f"{name} {epoch + 1}/{cfg.epochs}", unit="batch", disable=None if is_main() else True)
        for x, y in bar:
            for g in opt.param_groups:
                g["lr"] = poly_lr(g["base_lr"], it, max_it, warmup)
            x = x.to(device, non_blocking=True, memory_format=layout)
            y = y.to(device, non_blocking=True)
            if batch_hook is not None:
                x, y = batch_hook(x, y, np.random.default_rng([seed, 7919, it]))
            it += 1
            with autocast(device, amp):
                loss = step(x, y)
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            total += float(loss.detach()) * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.4f}")
        total, n = reduce_sum(total, n, device)
        if not math.isfinite(total):
            raise WsssError(f"{name}: loss became {total} in epoch {epoch + 1}; lower {section or name}.lr")
        row: dict[str, Any] = {"epoch": epoch + 1, "loss": round(total / max(n, 1), 5), "lr": round(opt.param_groups[0]["lr"], 7)}
        if not is_main():  # rank 0 scores, checkpoints and logs; the others wait for it
            barrier()
            continue
        if evaluate is not None:
            with averaged_weights(model, ema):
                row.update(evaluate(epoch))
        row["seconds"] = round(time.time() - t0, 2)
        history.append(row)
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                                    "rng": torch.get_rng_state(), "epoch": epoch + 1, "iteration": it, "config": settings,
                                    "history": history, "meta": dict(meta or {}),
                                    **({"ema": ema.state_dict()} if ema is not None else {})})
        write_log_csv(out_dir / "log.csv", history)
        log.info("%s epoch %d/%d: %s", name, epoch + 1, cfg.epochs, ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        barrier()
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return {"epochs": cfg.epochs, "iterations": it, "final": history[-1] if history else {}, "history": history}
