"""The pipeline layer: the table of stages (:mod:`~wsss.pipeline.table`) and the runner that does every
stage's bookkeeping and runs flows of stages (:mod:`~wsss.pipeline.runner`); the adapters that wire a
stage's config and folders to a domain core are :mod:`wsss.stages`."""
