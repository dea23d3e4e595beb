"""The one safetensors header parser: every tensor's dtype, shape and place in the file, checked as
the safetensors library checks them. It needs no torch, so the generator can read an index from a
lone `model.safetensors` without importing it."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import dtypes

MAX_HEADER_BYTES = 100 * 1000**2


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its file (as the index names it), dtype name, shape, the
    offset of its first byte in the file, and its size."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path, file: str | None = None) -> dict[str, HeaderEntry]:
    """Every tensor of a safetensors file: known dtypes, sizes that match shapes, and data that
    covers the file exactly. `file` is the name the tensors are filed under (the index's path; by
    default the file's name)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 0 or length > min(size - 8, MAX_HEADER_BYTES):
            raise ConversionError(
                f"{path}: unreadable safetensors file, truncated or corrupt (bad header length)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != math.prod(shape) * dtypes.itemsize(dtype) or begin < 0:
                raise ValueError(f"{name}: {end - begin} bytes for shape {list(shape)} {dtype}")
            entries[name] = HeaderEntry(
                file or path.name, dtype, shape, 8 + length + begin, end - begin
            )
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
    ) as e:
        raise ConversionError(
            f"{path}: unreadable safetensors file, truncated or corrupt ({e!r})"
        ) from None
    covered = 8 + length
    for entry in sorted(entries.values(), key=lambda t: t.offset):
        if entry.offset != covered:
            raise ConversionError(
                f"{path}: unreadable safetensors file, truncated or corrupt (tensor data is not contiguous)"
            )
        covered += entry.nbytes
    if covered != size:
        raise ConversionError(
            f"{path}: unreadable safetensors file, truncated or corrupt ({size} bytes, header describes {covered})"
        )
    return entries
