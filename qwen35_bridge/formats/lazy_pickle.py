"""`torch.save` files opened without running their code, their tensors read only when asked for.

A trainer's checkpoint file holds the model beside its optimizer state and `args`, an
`argparse.Namespace` whose values may be any class of the trainer's code. Loading it with
`weights_only=True` fails on those classes; with `weights_only=False` it would run whatever the file
names. Here the file's pickle is read with an unpickler that builds nothing but plain containers:
every class becomes an inert stand-in that keeps its pickled state, and every tensor a
`LazyTensor`, a description (storage, offset, shape, strides, dtype) whose bytes are read from the
archive only by `read`, into a buffer reused once no tensor holds it. The optimizer's moments,
never asked for, are never read, and nothing of the file stays mapped.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.storage import _get_dtype_from_pickle_storage_type

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.buffers import ReadBuffers

_LOCAL_HEADER = struct.Struct("<4s2x2x2x2x2x4x4x4xHH")  # signature ... name length, extra length


class Stub:
    """Stands in for a class of the trainer's code: it keeps what the pickle gives it, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a `torch.save` archive, not read yet."""

    archive: TorchSaveFile
    storage: _Storage
    offset: int  # in elements of the storage
    shape: torch.Size
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def read(self) -> torch.Tensor:
        return self.archive.read(self)

    def rows(self, start: int, stop: int) -> LazyTensor:
        """Rows `[start, stop)` of this tensor, not read yet either."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of a tensor of {self.shape[0]}")
        shape = torch.Size((stop - start, *self.shape[1:]))
        return LazyTensor(
            self.archive, self.storage, self.offset + start * self.stride[0], shape, self.stride
        )


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> LazyTensor:
    return LazyTensor(storage.archive, storage.storage, offset, torch.Size(size), tuple(stride))


def _rebuild_parameter(data, *_rest) -> Any:
    return data  # a Parameter's data; whether it wants gradients does not matter here


@dataclass(frozen=True)
class _BoundStorage:
    archive: TorchSaveFile
    storage: _Storage


class _Dict(dict):
    """A state dict: it may carry attributes (`_metadata`, as PyTorch's state dicts do)."""


#: What a `torch.save` pickle may call; each is answered by a function of this module.
_BUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _Dict,
    ("torch", "Size"): torch.Size,
}


class _Unpickler(pickle.Unpickler):
    _stubs: dict[str, type] = {}

    def __init__(self, file: Any, archive: TorchSaveFile) -> None:
        super().__init__(file)
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _BUILDERS:
            return _BUILDERS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return name
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return self._stubs.setdefault(
            f"{module}.{name}", type(name, (Stub,), {"__module__": f"stub.{module}"})
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = (
            _get_dtype_from_pickle_storage_type(storage_type)
            if isinstance(storage_type, str)
            else storage_type
        )
        return _BoundStorage(self._archive, _Storage(str(key), dtype, int(numel)))


class TorchSaveFile:
    """A `torch.save` archive: its object (`object`), and its tensors read on request."""

    def __init__(self, path: Path, buffers: ReadBuffers | None = None) -> None:
        """`buffers`: where tensors are read into (several archives of one checkpoint share one)."""
        self.path = Path(path)
        if not zipfile.is_zipfile(self.path):
            raise ConversionError(
                f"{self.path}: not a torch.save archive (missing, truncated, or saved in "
                "PyTorch's pre-1.6 format)"
            )
        self._fd = os.open(self.path, os.O_RDONLY)
        self._buffers = buffers if buffers is not None else ReadBuffers()
        try:
            self.object = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Any:
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
                pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
                if len(pickles) != 1:
                    raise ConversionError(f"{self.path}: not a torch.save archive (no data.pkl)")
                prefix = pickles[0].filename[: -len("data.pkl")]
                order = (
                    archive.read(f"{prefix}byteorder")
                    if f"{prefix}byteorder" in archive.namelist()
                    else b"little"
                )
                if order != b"little":
                    raise ConversionError(
                        f"{self.path}: stored {order.decode()}-endian; not supported"
                    )
                self._data = {
                    i.filename[len(prefix) + len("data/") :]: (self._data_start(i), i)
                    for i in infos
                    if i.filename.startswith(f"{prefix}data/")
                }
                with archive.open(pickles[0]) as stream:
                    return _Unpickler(stream, self).load()
        except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
            raise ConversionError(
                f"{self.path}: cannot read this torch.save archive ({e})"
            ) from None

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConversionError(f"{self.path}: {info.filename} is compressed; not supported")
        header = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise ConversionError(f"{self.path}: corrupt zip entry {info.filename}")
        return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length

    def read(self, tensor: LazyTensor) -> torch.Tensor:
        """The tensor's values, read from the archive into memory of their own."""
        start, info = self._data[tensor.storage.key]
        itemsize = tensor.dtype.itemsize
        numel = math.prod(tensor.shape)
        span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) if numel else 0
        if (
            tensor.offset + span
        ) * itemsize > info.file_size or tensor.storage.numel * itemsize > info.file_size:
            raise ConversionError(f"{self.path}: a tensor reaches past the end of its storage")
        contiguous = tensor.stride == _contiguous_strides(tensor.shape)
        buffer = self._buffers.empty((numel if contiguous else span,), tensor.dtype)
        view = memoryview(buffer.view(torch.uint8).numpy())
        done, first = 0, start + tensor.offset * itemsize
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], first + done)
            if count == 0:
                raise ConversionError(
                    f"{self.path}: truncated; a tensor's data reaches past its end"
                )
            done += count
        if contiguous:
            return buffer.reshape(tensor.shape)
        return buffer.as_strided(tensor.shape, tensor.stride).contiguous()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def load(path: Path, buffers: ReadBuffers | None = None) -> tuple[Any, TorchSaveFile]:
    """The object `torch.save` wrote to `path` (its tensors `LazyTensor`s, every class a
    `Stub`) and the open archive they read from."""
    archive = TorchSaveFile(path, buffers)
    return archive.object, archive
