"""Models: backbones (a registry), the CAM classifier, segmenters."""

from wsss.models.backbones import BACKBONES, create_backbone
from wsss.models.classifier import Classifier
from wsss.models import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers backbones)
from wsss.models import resnet as _resnet  # noqa: F401  (registers backbones)
from wsss.models import timm_backbone as _timm  # noqa: F401  (registers the timm: family)

__all__ = ["BACKBONES", "create_backbone", "Classifier"]
