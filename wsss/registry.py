"""Name -> factory registries (backbones, CAM methods, expansion methods, segmenters)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from wsss.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A registry of factories; :meth:`create` lists the valid names when given an unknown one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}' (valid: {', '.join(self.names())})") from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._items
