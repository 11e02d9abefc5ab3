"""Models: backbones (a registry), the CAM classifier, segmenters."""

from wsss.models.backbones import BACKBONES, create_backbone
from wsss.models.classifier import Classifier

__all__ = ["BACKBONES", "create_backbone", "Classifier"]
