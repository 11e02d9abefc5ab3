"""Loading weight files safely (``weights_only=True``) with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch

from wsss.errors import WsssError, brief


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path``: a ``.safetensors`` file, or a torch file holding a bare state dict or a
    checkpoint with a ``model`` / ``state_dict`` key."""
    path = Path(path)
    if not path.is_file():
        raise WsssError(f"weights file for {what} not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, not a torch file
        raise WsssError(f"cannot load weights for {what} ({type(e).__name__}: {brief(e, 120)})", path) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WsssError(f"weights file for {what} holds a {type(obj).__name__}, not a state dict", path)
    return obj
