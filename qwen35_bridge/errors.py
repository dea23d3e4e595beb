"""Errors the user can act on: the command line prints them as one line and exits with status 2."""

from __future__ import annotations


class BridgeError(Exception):
    """A problem with the user's input or request, not a bug in this package."""

    exit_code = 2


class ConversionError(BridgeError):
    """A checkpoint that does not match its bridge: missing, unexpected, duplicate or mis-shaped tensors."""
