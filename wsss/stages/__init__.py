"""Stage adapters, one module per row of :data:`wsss.pipeline.table.STAGES` (``train-cls`` ->
``train_cls.py``). Each wires config + folders to a domain core and provides ``inputs``, ``section``,
``run`` and ``summary`` for :mod:`wsss.pipeline.runner`; adapters never import each other."""
