"""Safetensors checkpoints on disk: a lazy, validated reader, and a destination folder that only
appears once it is complete.

The reader trusts nothing: every shard the index names must exist and hold exactly the tensors the
index gives it; a tensor in two shards, a truncated or corrupt file, a tensor no index lists are
errors naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codegen.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file
    nbytes: int


MAX_HEADER_BYTES = 100 * 1000**2


def read_header(path: Path, file: str | None = None) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors file, from its header, checked as the safetensors library
    checks it: known dtypes, sizes that match shapes, and data that covers the file exactly. `file`
    is the name the tensors are filed under (the index's path; by default the file's name)."""
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
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        tensors = {}
        for name, entry in entries.items():
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise ValueError(
                    f"{name}: {end - begin} bytes for shape {list(shape)} {entry['dtype']}"
                )
            tensors[name] = TensorInfo(
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
    for info in sorted(tensors.values(), key=lambda t: t.offset):
        if info.offset != covered:
            raise ConversionError(
                f"{path}: unreadable safetensors file, truncated or corrupt (tensor data is not contiguous)"
            )
        covered += info.nbytes
    if covered != size:
        raise ConversionError(
            f"{path}: unreadable safetensors file, truncated or corrupt ({size} bytes, header describes {covered})"
        )
    return tensors


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder, read one at a time.

    Each tensor is memory-mapped on its own (copy-on-write, so never written back) and unmapped
    when the tensor is freed: no copy on the way in, and resident memory is the group being
    converted, not every page of the file touched so far (as with one mapping of the whole file).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
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
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None  # type: ignore[assignment]
        else:
            raise ConversionError(f"{self.directory}: no {INDEX_NAME} or {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
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


@contextmanager
def staged_directory(
    destination: Path, *, force: bool = False, source: Path | None = None
) -> Iterator[Path]:
    """A temporary folder beside `destination`, renamed into place only if the block succeeds.

    An interrupted or failed run leaves nothing that looks like a checkpoint; an existing
    destination is replaced only with `force`, and never when it is, or holds, the `source`.
    """
    destination = Path(destination)
    _check_destination(destination, force=force, source=source)
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


def _check_destination(destination: Path, *, force: bool, source: Path | None) -> None:
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
