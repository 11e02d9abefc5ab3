"""Stage 3: expansion methods that make CAMs cover whole objects (see :mod:`wsss.expand.methods`)."""

from wsss.expand.methods import EXPAND_METHODS, create_expand_methods

__all__ = ["EXPAND_METHODS", "create_expand_methods"]
