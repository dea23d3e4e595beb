"""Errors the user can act on. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from typing import Any


class CodegenError(Exception):
    """A problem with the user's input or request, not a bug in the generator."""

    exit_code = 2


class ConfigError(CodegenError):
    """A config field that is missing, unknown, unsupported or contradicts another one."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        shown = "missing" if value is _MISSING else repr(value)
        super().__init__(f"config field {field}: {shown}; expected {expected}")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
MISSING = _MISSING


class SourceError(CodegenError):
    """A model reference that cannot be resolved to a config."""


class ConversionError(CodegenError):
    """A checkpoint that does not match its bridge: missing, unexpected, duplicate or mis-shaped tensors."""
