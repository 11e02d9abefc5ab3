"""End-to-end flows built only from the public stage functions of :mod:`wsss.stages`."""
