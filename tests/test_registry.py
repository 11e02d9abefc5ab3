"""The name -> factory registry: unknown names list the valid ones, prefix families resolve by prefix."""

from __future__ import annotations

import pytest

from wsss.errors import ConfigError
from wsss.registry import Registry


def _registry() -> Registry:
    reg: Registry = Registry("widget")
    reg.register("plain")(lambda size=1: ("plain", size))

    def check(rest: str) -> None:
        if rest != "good":
            raise ConfigError(f"no lib widget '{rest}'")

    reg.register_prefix("lib:", lambda rest, size=1: ("lib", rest, size), check, "any lib widget")
    return reg


def test_prefix_family_resolves_and_checks_the_rest():
    reg = _registry()
    assert reg.create("plain", size=2) == ("plain", 2)
    assert reg.create("lib:good", size=3) == ("lib", "good", 3)
    assert "lib:good" in reg and "lib:bad" not in reg and "nope" not in reg
    with pytest.raises(ConfigError, match="no lib widget 'bad'"):
        reg.get("lib:bad")
    with pytest.raises(ConfigError, match=r"unknown widget 'nope' \(valid: plain, lib:<any lib widget>\)"):
        reg.get("nope")
    assert reg.names() == ["plain"] and reg.families() == ["lib:<any lib widget>"]


def test_names_and_prefixes_cannot_be_registered_twice():
    reg = _registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("plain")(lambda: None)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register_prefix("lib:", lambda rest: None, lambda rest: None, "x")
