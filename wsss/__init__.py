"""wsss: weakly-supervised semantic segmentation, from image-level tags to pixel masks."""

__version__ = "0.1.0"

__all__ = ["__version__"]
