"""A safetensors writer that streams: each tensor's bytes go to disk as soon as it is converted.

The safetensors library writes a whole file from a dict of tensors held in memory. A conversion
knows every output tensor's name, dtype and shape before reading any data (from the bridge's table
and the source's headers), so it can lay out the shards and write their headers first, then append
each tensor as it comes: memory holds one group of tensors, never a shard. The files are plain
safetensors (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length, a JSON header with dtype, shape and byte offsets, then the data.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import direct, dtypes, spans
from qwen35_bridge.formats.spans import StoredTensor
from qwen35_bridge.paths import INDEX_NAME

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class Planned:
    """One output tensor, known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: Sequence[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own), keeping the write order."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [s for s in shards if s]


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(tensors: Iterable[Planned], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": dtypes.from_torch(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


Opener = Callable[[Path], BinaryIO]


class StreamingWriter:
    """Writes planned shards in order; `write(name, tensor)` must follow the plan's order."""

    def __init__(
        self,
        directory: Path,
        shards: list[list[Planned]],
        *,
        names: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        opener: Opener | None = None,
    ) -> None:
        """`names`: the shards' file names (by default numbered as one writer's are)."""
        self.directory = Path(directory)
        self.names = names if names is not None else shard_file_names(len(shards))
        self._shards = shards
        self._metadata = {"format": "pt", **(metadata or {})}
        self._open = opener or direct.open_output
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard]
        self._position = 0
        self._rows_written = 0  # of the planned tensor at `_position`, written in parts
        self._current = -1
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: self.names[i] for i, t in self._order}

    def write(
        self, name: str, tensor: torch.Tensor | StoredTensor, rows: tuple[int, int] | None = None
    ) -> None:
        """The next planned tensor, whole, or its rows `[start, stop)` (a part of a group too
        large to hold whole): parts follow one another, and the tensor is done when the last
        row is written. A `StoredTensor` is copied from the files it lies in."""
        if self._position >= len(self._order):
            raise ConversionError(f"{name}: more tensors than planned")
        shard, planned = self._order[self._position]
        if name != planned.name:
            raise ConversionError(f"{name}: written out of order, expected {planned.name}")
        start, stop = rows if rows is not None else (0, planned.shape[0] if planned.shape else 0)
        expected = (stop - start, *planned.shape[1:]) if rows is not None else planned.shape
        if (
            start != self._rows_written
            or tensor.dtype != planned.dtype
            or tuple(tensor.shape) != tuple(expected)
        ):
            raise ConversionError(
                f"{name}: {tensor.dtype} {list(tensor.shape)} at row {start}, planned "
                f"{planned.dtype} {list(expected)} at row {self._rows_written}"
            )
        if shard != self._current:
            self._next_shard(shard)
        if isinstance(tensor, StoredTensor):  # copied from its file, unread
            self._write(tensor, name)
        else:
            data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()
            self._write(memoryview(data) if tensor.numel() else b"", name)
        if rows is not None and stop < planned.shape[0]:
            self._rows_written = stop
            return
        self._rows_written = 0
        self.bytes_written += planned.nbytes
        self._position += 1

    def _write(self, data: memoryview | bytes | StoredTensor, name: str) -> None:
        assert self._file is not None
        try:
            if isinstance(data, StoredTensor):
                spans.append(data.spans, self._file)
            else:
                self._file.write(data)
        except OSError as e:
            # a copy fails on either side: a full disk here, or a source that cannot be read
            copied = f", copied from {data.spans[0].path}" if isinstance(data, StoredTensor) else ""
            raise ConversionError(
                f"{self.directory / self.names[self._current]}: cannot write tensor {name} "
                f"({e.strerror or e}{copied})"
            ) from None

    def _next_shard(self, shard: int) -> None:
        self._close_file()
        self._current = shard
        path = self.directory / self.names[shard]
        try:
            self._file = self._open(path)
        except OSError as e:
            raise ConversionError(f"{path}: cannot create ({e.strerror or e})") from None
        self._write(_header(self._shards[shard], self._metadata), "(header)")

    def _close_file(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            try:
                file.flush()
            finally:
                file.close()  # a direct file writes its last blocks here
        except OSError as e:
            raise ConversionError(
                f"{self.directory / self.names[self._current]}: cannot finish writing ({e.strerror or e})"
            ) from None

    def close(self) -> None:
        """Finish the last shard; every planned tensor must have been written."""
        if self._position != len(self._order):
            missing = self._order[self._position][1].name
            raise ConversionError(f"{missing}: planned but never written")
        self._close_file()

    def abort(self) -> None:
        if self._file is not None:
            getattr(self._file, "abort", self._file.close)()  # a direct file: unfinished
            self._file = None


def write_index(
    directory: Path,
    weight_map: dict[str, str],
    total_size: int,
    metadata: dict[str, str] | None = None,
) -> None:
    index = {
        "metadata": {"total_size": total_size, **(metadata or {})},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (Path(directory) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
