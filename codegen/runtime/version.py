"""The megatron-core release a generated bridge was written for, checked when it is imported."""

from __future__ import annotations

from importlib import metadata


def require_megatron_core(series: str) -> None:
    """Raise ImportError unless the installed megatron-core is of `series` (e.g. "0.19" = 0.19.*).

    Parameter names and layouts differ between releases, so a bridge must not run against another.
    """
    try:
        installed = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        raise ImportError(
            f"this bridge needs megatron-core {series}.*, which is not installed"
        ) from None
    if installed.split(".")[:2] != series.split("."):
        raise ImportError(
            f"this bridge needs megatron-core {series}.*, but {installed} is installed"
        )
