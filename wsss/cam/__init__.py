"""Class activation maps: a method registry and batched multi-scale + flip extraction."""

from wsss.cam.extract import extract_cams
from wsss.cam.methods import CAM_METHODS, CAMMethod, create_cam_method

__all__ = ["CAM_METHODS", "CAMMethod", "create_cam_method", "extract_cams"]
