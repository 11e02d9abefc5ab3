"""The training engine: one :func:`fit` loop (:mod:`wsss.engine.core`) and the training recipes built on
it: the classifier (:mod:`wsss.engine.classifier`) and the segmenter (:mod:`wsss.engine.segmenter`); the
affinity head's is :mod:`wsss.affinity.train`."""

from wsss.engine.core import fit

__all__ = ["fit"]
