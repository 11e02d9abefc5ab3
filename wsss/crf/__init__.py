"""Dense-CRF refinement: the pure functions (:mod:`wsss.crf.dense`), a folder of CAMs into pseudo-mask PNGs
in worker processes (:mod:`wsss.crf.pool`) and choosing settings on a labelled subset (:mod:`wsss.crf.sweep`)."""

from wsss.crf.dense import dense_crf, dense_crf_many, mask_stats, pseudo_mask, refine, refine_many, unary_energy

__all__ = ["dense_crf", "dense_crf_many", "mask_stats", "pseudo_mask", "refine", "refine_many", "unary_energy"]
