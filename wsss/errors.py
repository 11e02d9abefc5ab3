"""User-facing errors: each is printed by the CLI as one line, with a non-zero exit code."""

from __future__ import annotations

from pathlib import Path


class WsssError(Exception):
    """An error caused by the user's input or environment, reported as one line (no traceback)."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ConfigError(WsssError):
    """Bad configuration: unknown key, wrong type, out-of-range value, bad override."""

    exit_code = 2


class DataError(WsssError):
    """A dataset file is missing, malformed or inconsistent."""


class ImageReadError(DataError):
    """An image or mask file cannot be decoded."""


def brief(exc: BaseException, limit: int = 150) -> str:
    """First line of an exception's message (or its type name), cut to ``limit`` characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
