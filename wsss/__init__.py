"""wsss: weakly-supervised semantic segmentation, from image-level tags to pixel masks.

The public API (see :mod:`wsss.api`): :func:`load_config`, :func:`run`, :class:`Segmenter`,
:class:`Classifier`. Attributes load lazily, so ``import wsss`` does not import torch.
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "run", "Segmenter", "Classifier"]


def __getattr__(name: str) -> Any:
    if name in ("load_config", "run", "Segmenter", "Classifier"):
        from wsss import api

        return getattr(api, name)
    raise AttributeError(f"module 'wsss' has no attribute '{name}'")
