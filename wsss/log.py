"""Logging set-up for the CLI. The library only logs; it never configures handlers itself."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


class _TqdmHandler(logging.Handler):
    """Writes log lines through tqdm so that they do not break live progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbosity: int = 0) -> None:
    """Configure the ``wsss`` logger for command-line use (0 = info, 1+ = debug, -1 = warnings)."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    logger = logging.getLogger("wsss")
    logger.handlers.clear()
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def progress(iterable=None, *, total: int | None = None, desc: str = "", disable: bool | None = None, **kw):
    """A tqdm progress bar on stderr; hidden automatically when stderr is not a terminal and
    ``WSSS_PROGRESS`` is unset, so logs and CI output stay clean."""
    import os

    if disable is None:
        env = os.environ.get("WSSS_PROGRESS")
        disable = (env == "0") if env is not None else not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, dynamic_ncols=True, **kw)
