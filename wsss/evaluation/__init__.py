"""Evaluation against ground truth (never used to make maps or masks): metrics (:mod:`~wsss.evaluation.metrics`),
CAM threshold sweeps (:mod:`~wsss.evaluation.cams`), masks and predictions (:mod:`~wsss.evaluation.masks`), a
segmenter in memory (:mod:`~wsss.evaluation.seg`)."""

from wsss.evaluation.cams import SweepResult, cams_to_mask, plot_sweep, sweep_cam_thresholds

__all__ = ["SweepResult", "cams_to_mask", "plot_sweep", "sweep_cam_thresholds"]
