"""Flows: lists of stages of :data:`wsss.pipeline.table.STAGES` run by :func:`wsss.pipeline.runner.run_flow`."""
