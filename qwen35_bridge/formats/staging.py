"""Destinations that appear only once complete: a conversion writes into a hidden folder beside its
destination and renames it into place when everything is written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qwen35_bridge.errors import ConversionError


@contextmanager
def staged_directory(
    destination: Path, *, force: bool = False, source: Path | None = None
) -> Iterator[Path]:
    """A temporary folder beside `destination`, renamed into place only if the block succeeds.

    An interrupted or failed run leaves nothing that looks like a checkpoint; an existing
    destination is replaced only with `force`, and never when it is, or holds, the `source`.
    """
    destination = Path(destination)
    check_destination(destination, force=force, source=source)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent)
        )
    except OSError as e:
        raise ConversionError(f"{destination}: cannot create it here ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # as a folder made with mkdir, not mkdtemp's private 0700
    try:
        yield staging
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_destination(destination: Path, *, force: bool, source: Path | None) -> None:
    """Refuse a destination that is, or holds, the source; one that exists without `force`; and
    anything but a folder with it."""
    if source is not None:
        dst, src = destination.resolve(), Path(source).resolve()
        if dst == src or dst in src.parents:
            raise ConversionError(
                f"{destination}: is or holds the source {source}; choose another destination"
            )
    if not (destination.exists() or destination.is_symlink()):
        return
    if not force:
        raise ConversionError(f"{destination}: already exists; pass --force to replace it")
    if destination.is_symlink() or not destination.is_dir():
        raise ConversionError(
            f"{destination}: exists and is not a folder; --force replaces only a folder"
        )
