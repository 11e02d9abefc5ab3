"""Name -> factory registries (backbones, CAM methods, expansion methods, segmenters)."""

from __future__ import annotations

import functools
from typing import Callable, Generic, TypeVar

from wsss.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of factories; :meth:`create` lists the valid names when given an unknown one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        # "timm:" -> (factory(rest, **kw), check(rest) raising ConfigError, what the rest is)
        self._prefixes: dict[str, tuple[Callable[..., T], Callable[[str], None], str]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def register_prefix(self, prefix: str, factory: Callable[..., T], check: Callable[[str], None], what: str) -> None:
        """Names ``prefix + rest`` resolve to ``factory(rest, **kwargs)`` (a family of models named by another
        library, e.g. ``timm:resnet50``); ``check(rest)`` raises :class:`ConfigError` for a bad ``rest``."""
        if prefix in self._prefixes:
            raise ValueError(f"{self.kind} prefix '{prefix}' registered twice")
        self._prefixes[prefix] = (factory, check, what)

    def names(self) -> list[str]:
        """The registered names (prefix families not included: see :meth:`families`)."""
        return sorted(self._items)

    def families(self) -> list[str]:
        """The prefix families, as ``prefix<what>``."""
        return [f"{p}<{what}>" for p, (_, _, what) in sorted(self._prefixes.items())]

    def get(self, name: str) -> Callable[..., T]:
        if name in self._items:
            return self._items[name]
        for prefix, (factory, check, _) in self._prefixes.items():
            if name.startswith(prefix):
                check(name[len(prefix):])
                return functools.partial(factory, name[len(prefix):])
        raise ConfigError(f"unknown {self.kind} '{name}' (valid: {', '.join(self.names() + self.families())})")

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ConfigError:
            return False
        return True
