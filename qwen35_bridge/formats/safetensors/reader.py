"""A safetensors checkpoint folder read lazily, one tensor (or one run of tensors) at a time.

The reader trusts nothing: every shard the index names must exist and hold exactly the tensors the
index gives it; a tensor in two shards, a truncated or corrupt file, a tensor no index lists are
errors naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import dtypes
from qwen35_bridge.formats.modelopt import refuse_modelopt
from qwen35_bridge.formats.safetensors import header
from qwen35_bridge.formats.spans import Span, StoredTensor
from qwen35_bridge.paths import INDEX_NAME, SINGLE_FILE_NAME


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a checkpoint folder: its header entry with the dtype as torch's."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file
    nbytes: int


def read_header(path: Path, file: str | None = None) -> dict[str, TensorInfo]:
    """`header.read_header`, dtypes as torch's."""
    return {
        name: TensorInfo(e.file, dtypes.to_torch(e.dtype), e.shape, e.offset, e.nbytes)
        for name, e in header.read_header(path, file).items()
    }


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder, read one at a time.

    Each tensor is memory-mapped on its own (copy-on-write, so never written back) and unmapped
    when the tensor is freed: no copy on the way in, and resident memory is the group being
    converted, not every page of the file touched so far (as with one mapping of the whole file).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        refuse_modelopt(self.directory)
        self._fds: dict[str, int] = {}
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index_path = self.directory / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map: dict[str, str] = index["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index ({e!r})") from None
            self.metadata = index.get("metadata") or {}
        elif (self.directory / SINGLE_FILE_NAME).is_file():
            weight_map = None  # type: ignore[assignment]
        else:
            raise ConversionError(f"{self.directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE_NAME]
        for file in files:
            if Path(file).is_absolute() or ".." in Path(file).parts:
                raise ConversionError(
                    f"{self.directory / INDEX_NAME}: shard {file} lies outside the checkpoint folder"
                )
            if not (self.directory / file).is_file():
                example = next(k for k, v in weight_map.items() if v == file)
                raise ConversionError(
                    f"{self.directory / file}: shard named by the index (for {example}) does not exist or is not a file"
                )
        for file in files:
            path = self.directory / file
            for name, info in read_header(path, file).items():
                if name in self.tensors:
                    raise ConversionError(
                        f"{name}: duplicate tensor, in {self.tensors[name].file} and {file}"
                    )
                if weight_map is not None and weight_map.get(name) != file:
                    listed = (
                        f"the index puts it in {weight_map[name]}"
                        if name in weight_map
                        else "the index does not list it"
                    )
                    raise ConversionError(f"{path}: holds tensor {name}, but {listed}")
                self.tensors[name] = info
            self._fds[file] = os.open(path, os.O_RDONLY)
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.tensors:
                    raise ConversionError(
                        f"{self.directory / file}: lacks tensor {name}, which the index puts there"
                    )

    def names(self) -> set[str]:
        return set(self.tensors)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def file(self, name: str) -> str:
        return self.tensors[name].file

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors; those lying one after another in one file share one mapping, so that
        tensors stored together (a layer's experts) can be viewed together without a copy."""
        for name in names:
            if name not in self.tensors:
                raise ConversionError(f"{name}: not in the checkpoint at {self.directory}")
        out: dict[str, torch.Tensor] = {}
        for run in _runs([self.tensors[n] for n in names], names):
            out.update(self._map(run))
        return out

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of a tensor, mapped on their own (the rest is not touched)."""
        if name not in self.tensors:
            raise ConversionError(f"{name}: not in the checkpoint at {self.directory}")
        info = self.tensors[name]
        row = info.nbytes // info.shape[0]
        rows = TensorInfo(
            info.file,
            info.dtype,
            (stop - start, *info.shape[1:]),
            info.offset + start * row,
            (stop - start) * row,
        )
        return self._map([(name, rows)])[name]

    def stored(self, name: str) -> StoredTensor:
        """Where the tensor's bytes lie, for copying them file to file unread."""
        info = self.tensors[name]
        span = Span(self._fds[info.file], info.offset, info.nbytes, str(self.directory / info.file))
        return StoredTensor(info.dtype, info.shape, (span,) if info.nbytes else ())

    def _map(self, run: list[tuple[str, TensorInfo]]) -> dict[str, torch.Tensor]:
        first, last = run[0][1], run[-1][1]
        if last.offset + last.nbytes == first.offset:
            return {name: torch.empty(info.shape, dtype=info.dtype) for name, info in run}
        start = first.offset - first.offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                self._fds[first.file],
                last.offset + last.nbytes - start,
                offset=start,
                access=mmap.ACCESS_COPY,
            )
        except (OSError, ValueError) as e:
            raise ConversionError(
                f"{self.directory / first.file}: cannot read tensor {run[0][0]} ({e})"
            ) from None
        whole = torch.frombuffer(mapped, dtype=torch.uint8)
        out = {}
        for name, info in run:
            at = info.offset - start
            if at % info.dtype.itemsize == 0:  # views of one storage: stacked tensors stay views
                data = whole[at : at + info.nbytes].view(info.dtype)
            else:  # a writer that did not align the data
                data = torch.frombuffer(
                    mapped, dtype=info.dtype, offset=at, count=math.prod(info.shape)
                )
            out[name] = data.reshape(info.shape)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(infos: list[TensorInfo], names: list[str]) -> list[list[tuple[str, TensorInfo]]]:
    """The tensors grouped into runs that follow each other in one file, in the order asked."""
    runs: list[list[tuple[str, TensorInfo]]] = []
    for name, info in zip(names, infos):
        if runs:
            previous = runs[-1][-1][1]
            if previous.file == info.file and previous.offset + previous.nbytes == info.offset:
                runs[-1].append((name, info))
                continue
        runs.append([(name, info)])
    return runs
