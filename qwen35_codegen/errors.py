"""Errors of the generator's inputs. They are `BridgeError`s, so the command line reports every
user error the same way, whichever package raised it."""

from __future__ import annotations

from typing import Any

from qwen35_bridge.errors import BridgeError


class CodegenError(BridgeError):
    """A request the generator cannot carry out as asked."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


class ConfigError(CodegenError):
    """A config field that is missing, unknown, unsupported or contradicts another one."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        shown = "missing" if value is MISSING else repr(value)
        super().__init__(f"config field {field}: {shown}; expected {expected}")


class SourceError(CodegenError):
    """A model reference that cannot be resolved to a config."""
