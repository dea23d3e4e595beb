"""The megatron-core release everything here is written against, checked where it matters.

Parameter names, checkpoint layouts and the private names the CPU shims patch all change between
releases, so this is the one place that names the release.
"""

from __future__ import annotations

from importlib import metadata

#: The exact release the CPU shims and the torch_dist layouts are pinned to.
MEGATRON_CORE_VERSION = "0.19.2"
#: The release series a generated bridge accepts (its parameter names are those of the series).
MEGATRON_CORE_SERIES = ".".join(MEGATRON_CORE_VERSION.split(".")[:2])


def installed_megatron_core() -> str | None:
    """The installed megatron-core version, or None."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def require_megatron_core(series: str) -> None:
    """Raise ImportError unless the installed megatron-core is of `series` (e.g. "0.19" = 0.19.*).

    Generated bridges call this when imported: a bridge must not run against another release.
    """
    installed = installed_megatron_core()
    if installed is None:
        raise ImportError(f"this bridge needs megatron-core {series}.*, which is not installed")
    if installed.split(".")[:2] != series.split("."):
        raise ImportError(
            f"this bridge needs megatron-core {series}.*, but {installed} is installed"
        )


def require_pinned_megatron_core() -> None:
    """Raise ImportError unless the installed megatron-core is exactly MEGATRON_CORE_VERSION (what
    the CPU shims rely on)."""
    installed = installed_megatron_core()
    if installed is None:
        raise ImportError(
            f"megatron-core is not installed; expected megatron-core=={MEGATRON_CORE_VERSION}"
        )
    if installed != MEGATRON_CORE_VERSION:
        raise ImportError(
            f"megatron-core {installed} is installed, but the CPU shims are pinned to "
            f"{MEGATRON_CORE_VERSION}: re-check every name in qwen35_bridge/megatron/shims.py "
            "against the new release before changing qwen35_bridge.versions.MEGATRON_CORE_VERSION"
        )
