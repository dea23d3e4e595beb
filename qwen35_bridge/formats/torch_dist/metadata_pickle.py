"""DCP's `.metadata` pickled without importing DCP.

Importing `torch.distributed.checkpoint` costs about a second of CPU (it pulls in DTensor and
sympy): on a 2-core machine, as much as converting a gigabyte. A writer needs nothing from it but
the Metadata classes' names and the state their pickles carry, so the objects below stand in for
them: each pickles to the opcodes an instance of DCP's class pickles to (its module and name, then
its state), and `pickle.load` (DCP's reader, megatron-core's) builds DCP's own objects from them.
A test holds the unpickled Metadata against what DCP's own FileSystemWriter writes.
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION


@dataclass(frozen=True)
class _Class:
    """A class of DCP's, by name."""

    module: str
    name: str


@dataclass(frozen=True, eq=False)
class _Instance:
    """An instance of a DCP class: made with `cls.__new__(cls)`, then given `state` (its
    `__dict__`, or what its `__setstate__` takes)."""

    cls: _Class
    state: Any


@dataclass(frozen=True, eq=False)
class _Call:
    """What unpickles as `cls(*args)` (an enum member)."""

    cls: _Class
    args: tuple[Any, ...]


_TENSOR_STORAGE = _Class(_METADATA, "TensorStorageMetadata")
_TENSOR_PROPERTIES = _Class(_METADATA, "TensorProperties")
_CHUNK = _Class(_METADATA, "ChunkStorageMetadata")
_BYTES = _Class(_METADATA, "BytesStorageMetadata")
_INDEX = _Class(_METADATA, "MetadataIndex")
_STORAGE_META = _Class(_METADATA, "StorageMeta")
_METADATA_CLASS = _Class(_METADATA, "Metadata")
_STORAGE_INFO = _Class(_FILESYSTEM, "_StorageInfo")
_CONTIGUOUS = _Call(_Class(_METADATA, "_MEM_FORMAT_ENCODING"), (0,))  # TORCH_CONTIGUOUS_FORMAT


def tensor_storage(
    dtype: torch.dtype, size: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> _Instance:
    """A TensorStorageMetadata: a tensor of `size` in `chunks` of (offsets, sizes)."""
    # TensorProperties.__getstate__: dtype, layout, requires_grad, memory format, pin_memory
    properties = _Instance(_TENSOR_PROPERTIES, (dtype, torch.strided, False, _CONTIGUOUS, False))
    return _Instance(
        _TENSOR_STORAGE,
        {
            "properties": properties,
            "size": torch.Size(size),
            "chunks": [
                _Instance(_CHUNK, {"offsets": torch.Size(o), "sizes": torch.Size(s)})
                for o, s in chunks
            ],
        },
    )


def bytes_storage() -> _Instance:
    """A BytesStorageMetadata: a serialised object."""
    return _Instance(_BYTES, None)


def storage_index(key: str, offset: Sequence[int] | None, index: int | None) -> _Instance:
    """A MetadataIndex (whose __init__ sets fqn, index, then offset only when there is one)."""
    state: dict[str, Any] = {"fqn": key, "index": index}
    if offset is not None:
        state["offset"] = torch.Size(offset)
    return _Instance(_INDEX, state)


def storage_info(file: str, start: int, length: int) -> _Instance:
    """A filesystem _StorageInfo (whose __getstate__ leaves out the unset transforms)."""
    return _Instance(_STORAGE_INFO, {"relative_path": file, "offset": start, "length": length})


def metadata(
    state: Mapping[str, _Instance], storage: Mapping[_Instance, _Instance], checkpoint_id: str
) -> _Instance:
    """The Metadata DCP's default planner and FileSystemWriter make, with a fresh save id."""
    storage_meta = {
        "checkpoint_id": checkpoint_id,
        "save_id": str(uuid.uuid4()),
        "load_id": None,
        "modules": [],
    }
    return _Instance(
        _METADATA_CLASS,
        {
            "state_dict_metadata": dict(state),
            "planner_data": None,
            "storage_data": dict(storage),
            "storage_meta": _Instance(_STORAGE_META, storage_meta),
            "version": DCP_VERSION,
        },
    )


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch can take the stand-ins
    dispatch = dict(pickle._Pickler.dispatch)

    def save_class(self, obj: _Class) -> None:
        """As `save_global` writes a class at protocol 4, without importing its module."""
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_instance(self, obj: _Instance) -> None:
        """As `save_reduce` writes `copyreg.__newobj__(cls)` and its state."""
        self.save(obj.cls)
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def save_call(self, obj: _Call) -> None:
        """As `save_reduce` writes `cls(*args)`."""
        self.save(obj.cls)
        self.save(obj.args)
        self.write(pickle.REDUCE)
        self.memoize(obj)

    dispatch[_Class] = save_class
    dispatch[_Instance] = save_instance
    dispatch[_Call] = save_call


def dump(obj: _Instance, stream: BinaryIO) -> None:
    """Pickle `obj` (made by `metadata`) to `stream`, at the protocol DCP's `pickle.dump` uses."""
    _Pickler(stream, protocol=4).dump(obj)
