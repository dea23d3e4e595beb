"""Megatron `torch_dist` checkpoints, written from HF tensors and read back, without the model's
weights in memory.

The checkpoint's layout is megatron-core's own: the model is built on the meta device (no memory)
and its `sharded_state_dict()` says which keys, shapes and chunks a checkpoint holds, including the
factories that store GDN in_proj and conv1d as separate sections, GLU fc1 halves and stacked
experts (FACTS.md sections 5 to 7). That layout is plain data (which rows of which Megatron tensor
each chunk is), computed once per bridge and megatron-core release and cached, so a conversion
needs neither megatron-core's import nor the model. Chunk data is produced only when PyTorch
Distributed Checkpoint writes that chunk: memory holds a few converted groups, never the model.
The files are what `megatron.core.dist_checkpointing.save` writes, and load with
`dist_checkpointing.load(model.sharded_state_dict(), path)` at any TP/EP.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import math
import mmap
import os
import pickle
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from codegen.errors import ConversionError
from codegen.runtime.bridge import BridgeBase
from codegen.runtime.mappings import Group

LAYOUT_VERSION = 1
GROUP_CACHE = 1  # converted groups kept while writing (chunks are written key by key, group by group)
KEY_CACHE = 1  # checkpoint keys kept when reading (beyond those the current parameter needs)


@dataclass(frozen=True)
class Piece:
    """One chunk of checkpoint `key`: rows `rows` (all when None) of the Megatron tensor `param`
    (a bridge name), stored with shape `chunk_shape` at `offset` in a tensor of `global_shape`."""

    key: str
    param: str
    param_shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    rows: tuple[int, int] | None


@dataclass
class Layout:
    pieces: list[Piece]
    objects: dict[str, bytes]  # serialised ShardedObjects (extra state, common state) by key
    config: str  # metadata.json

    def params(self) -> set[str]:
        return {p.param for p in self.pieces}

    def to_json(self) -> str:
        return json.dumps(
            {
                "pieces": [asdict(p) for p in self.pieces],
                "objects": {k: base64.b64encode(v).decode() for k, v in self.objects.items()},
                "config": self.config,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data = json.loads(text)
        pieces = [Piece(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}) for p in data["pieces"]]
        return cls(pieces, {k: base64.b64decode(v) for k, v in data["objects"].items()}, data["config"])


# -- The layout, from megatron-core ------------------------------------------------------------------


@contextmanager
def meta_model(bridge: BridgeBase) -> Iterator[torch.nn.Module]:
    """The bridge's model at TP=PP=EP=1 on the meta device: its layout without its weights."""
    from codegen.runtime.parallel import destroy_parallel, init_parallel

    if any(name.startswith("vision_model.") for name in bridge.megatron_shapes):
        build = getattr(bridge, "build_vl_model", None)
        if build is None:
            raise ConversionError("torch_dist output of a vision-language checkpoint needs the Megatron VL model, which this runtime lacks")
    else:
        build = bridge.build_model
    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = build(**parallel)
        yield model
    finally:
        destroy_parallel()


def _walk(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf) of a nested state dict (dicts and lists, as factories build them)."""
    if isinstance(tree, Mapping):
        for name, value in tree.items():
            yield from _walk(value, f"{path}{name}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _walk(value, f"{path}{i}.")
    else:
        yield path.rstrip("."), tree


def compute_layout(bridge: BridgeBase) -> Layout:
    """Megatron-core's checkpoint layout of the bridge's model, as data."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    with meta_model(bridge) as model:
        prefix = bridge._prefix(model)
        _, state = extract_nonpersistent(model.sharded_state_dict())
        sharded, common = extract_sharded_base(state)
        pieces: list[Piece] = []
        objects: dict[str, bytes] = {}
        for path, value in _walk(sharded):
            if isinstance(value, ShardedObject):
                objects[value.unique_key] = _serialise(value.data)
            elif isinstance(value, ShardedTensorFactory):
                pieces += _factory_pieces(prefix + path, value)
            elif isinstance(value, ShardedTensor):
                pieces.append(_piece(value, prefix + path, tuple(value.data.shape), None))
            else:
                raise ConversionError(f"{path}: unexpected {type(value).__name__} in the sharded state dict")
        objects[ShardedObject("common_state", common, (1,), (0,)).unique_key] = _serialise(common)
    config = json.dumps(asdict(CheckpointingConfig("torch_dist", 1)))  # as save_config writes it
    return Layout(pieces, objects, config)


def _piece(sharded: Any, param: str, param_shape: tuple[int, ...], rows: tuple[int, int] | None) -> Piece:
    chunk = (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)
    return Piece(sharded.key, param, param_shape, tuple(sharded.global_shape), tuple(sharded.global_offset), chunk, rows)


def _factory_pieces(param: str, factory: Any) -> list[Piece]:
    """Which rows of the parameter each piece a factory builds holds, found by building it from a
    probe whose dim-0 index is its storage offset (slicing keeps that; anything else is refused)."""
    shape = tuple(factory.data.shape)
    probe = torch.arange(shape[0]).as_strided(shape, (1,) + (0,) * (len(shape) - 1))
    built = factory.build_fn(factory.key, probe, factory.replica_id, factory.flattened_range)
    pieces = []
    for _, sharded in _walk(built):
        data = sharded.data
        if data.untyped_storage().data_ptr() != probe.untyped_storage().data_ptr() or data.stride()[0] != 1 or tuple(data.shape[1:]) != shape[1:]:
            raise ConversionError(f"{param}: megatron-core stores it in a way other than row slices; not supported")
        start = data.storage_offset()
        pieces.append(_piece(sharded, param, shape, (start, start + data.shape[0])))
    return pieces


def _serialise(data: Any) -> bytes:
    """As megatron-core stores a ShardedObject: `torch.save([data])`, meta tensors made real."""
    buffer = io.BytesIO()
    torch.save([_real(data)], buffer)
    return buffer.getvalue()


def _real(data: Any) -> Any:
    if isinstance(data, torch.Tensor) and data.is_meta:
        return torch.empty(data.shape, dtype=data.dtype)
    if isinstance(data, Mapping):
        return {k: _real(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_real(v) for v in data]
    return data


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen35-bridge-codegen" / "torch_dist"


def layout(bridge: BridgeBase) -> Layout:
    """The bridge's layout, from the cache when this bridge and megatron-core release made it."""
    version = metadata.version("megatron-core")
    path = _cache_folder() / f"{bridge.spec_sha256}-megatron-core-{version}-v{LAYOUT_VERSION}.json"
    if path.is_file():
        return Layout.from_json(path.read_text())
    computed = compute_layout(bridge)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(computed.to_json())
    os.replace(staging, path)
    return computed


# -- Writing ------------------------------------------------------------------------------------------

DATA_FILE = "__0_0.distcp"  # what PyTorch DCP's FileSystemWriter names a single rank's only file


def _by_key(pieces: list[Piece]) -> dict[str, list[Piece]]:
    keys: dict[str, list[Piece]] = {}
    for piece in pieces:
        keys.setdefault(piece.key, []).append(piece)
    return keys


def _chunk_of(piece: Piece, full: torch.Tensor) -> torch.Tensor:
    data = full if piece.rows is None else full[piece.rows[0] : piece.rows[1]]
    return data.reshape(piece.chunk_shape)


class _GroupCache:
    """Converted groups, least recently used dropped first."""

    def __init__(self, convert: Callable[[Group], dict[str, torch.Tensor]], groups: tuple[Group, ...]) -> None:
        self._convert = convert
        self._group_of = {name: g for g in groups for name in g.megatron}
        self._cache: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def tensor(self, name: str) -> torch.Tensor:
        group = self._group_of[name]
        key = id(group)
        if key not in self._cache:
            self._cache[key] = self._convert(group)
            while len(self._cache) > GROUP_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][name]


def _expected(bridge: BridgeBase, found: set[str]) -> None:
    """The layout's tensors are exactly the bridge's (its language model's, for a text model)."""
    prefix = "" if any(name.startswith("vision_model.") for name in found) else bridge.megatron_prefix
    expected = {name for name in bridge.megatron_shapes if name.startswith(prefix)}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ConversionError(f"{missing[0]}: mapped by the bridge but not part of the torch_dist layout")
    if extra:
        raise ConversionError(f"{extra[0]}: part of the torch_dist layout but not mapped by the bridge")


@dataclass(frozen=True)
class _Record:
    """Where DCP finds a chunk (or a serialised object, `offset` None) in the data file."""

    key: str
    offset: tuple[int, ...] | None
    index: int | None
    start: int
    length: int


def write(
    bridge: BridgeBase,
    destination: Path,
    convert: Callable[[Group], dict[str, torch.Tensor]],
    dtype_of: Callable[[str], torch.dtype],
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Write `destination` as a torch_dist checkpoint; `convert(group)` gives a group's Megatron
    tensors, `dtype_of(name)` their dtype. Returns the bytes of tensor data written.

    The files are exactly those PyTorch DCP's FileSystemWriter writes for this state on one rank
    (objects, then each chunk as a `torch.save` record, then the pickled Metadata; a test holds
    them against DCP's own output), with torch.save's zip CRC32 turned off (see below). Writing the records here lets DCP's import, which costs as
    much as a gigabyte of I/O, run in the background meanwhile: only the Metadata needs it.
    """
    plan = layout(bridge)
    _expected(bridge, plan.params())
    dcp = _BackgroundImport("torch.distributed.checkpoint")
    cache = _GroupCache(convert, bridge.groups)
    by_key = _by_key(plan.pieces)
    records: list[_Record] = []
    written = 0
    with _without_zip_crc32(), (Path(destination) / DATA_FILE).open("wb") as stream:
        for key, payload in plan.objects.items():
            records.append(_Record(key, None, None, stream.tell(), len(payload)))
            stream.write(payload)
        for key, pieces in by_key.items():
            for index, piece in enumerate(pieces):
                chunk = _chunk_of(piece, cache.tensor(piece.param)).contiguous()
                if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
                    chunk = _own_storage(chunk)  # torch.save writes whole storages: only the chunk's
                start = stream.tell()
                torch.save(chunk, stream)
                records.append(_Record(key, piece.offset, index, start, stream.tell() - start))
                written += chunk.numel() * chunk.element_size()
                if on_chunk:
                    on_chunk(chunk.numel() * chunk.element_size())
    metadata = _metadata(dcp.module(), plan, by_key, records, dtype_of, str(destination))
    staging = Path(destination) / ".metadata.tmp"
    with staging.open("wb") as f:
        pickle.dump(metadata, f)
    os.replace(staging, Path(destination) / ".metadata")
    (Path(destination) / "metadata.json").write_text(plan.config)
    return written


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory under a storage of exactly its size (no copy, unlike `clone`)."""
    data = tensor.reshape(-1).view(torch.uint8).numpy()
    return torch.frombuffer(data, dtype=tensor.dtype).reshape(tensor.shape)


@contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """torch.save's zip CRC32 costs about 2.5 s per GB on these machines, and torch.load (so DCP
    and megatron-core) never checks it: records are written without it (torch's own option)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _metadata(dcp: Any, plan: Layout, by_key: dict[str, list[Piece]], records: list[_Record], dtype_of: Callable[[str], torch.dtype], checkpoint_id: str) -> Any:
    """DCP's Metadata for the records, as its default planner and FileSystemWriter make it."""
    md, filesystem = dcp.metadata, dcp.filesystem
    state: dict[str, Any] = {}
    for key, pieces in by_key.items():
        chunks = [md.ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=torch.Size(p.chunk_shape)) for p in pieces]
        state[key] = md.TensorStorageMetadata(md.TensorProperties(dtype=dtype_of(pieces[0].param)), torch.Size(pieces[0].global_shape), chunks)
    for key in plan.objects:
        state[key] = md.BytesStorageMetadata()
    storage = {
        md.MetadataIndex(r.key, None if r.offset is None else torch.Size(r.offset), r.index): filesystem._StorageInfo(DATA_FILE, r.start, r.length)
        for r in records
    }
    return md.Metadata(
        state_dict_metadata=state,
        planner_data=None,
        storage_data=storage,
        storage_meta=md.StorageMeta(checkpoint_id=checkpoint_id, save_id=str(uuid.uuid4())),
        version=filesystem.CURRENT_DCP_VERSION,
    )


class _BackgroundImport:
    """Imports a module in a thread, so its import overlaps with other work."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            importlib.import_module(self._name)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = e

    def module(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return importlib.import_module(self._name)


# -- Reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """What a checkpoint's Metadata says of one tensor key, and where its chunks are."""

    dtype: torch.dtype
    size: tuple[int, ...]
    chunks: dict[tuple[int, ...], tuple[tuple[int, ...], Any]]  # offsets -> (sizes, storage info)


class _Stub:
    """Stands in for a DCP metadata class, so that .metadata is read without importing DCP."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _MetadataUnpickler(pickle.Unpickler):
    _stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            return self._stubs.setdefault(f"{module}.{name}", type(name, (_Stub,), {}))
        return super().find_class(module, name)


def _read_metadata(directory: Path) -> dict[str, _Stored]:
    """The tensor keys of a DCP checkpoint, from its .metadata, read with stand-in classes."""
    with (Path(directory) / ".metadata").open("rb") as f:
        metadata = _MetadataUnpickler(f).load()
    locations = {(i.fqn, tuple(i.offset)): info for i, info in metadata.storage_data.items() if getattr(i, "offset", None) is not None}
    stored = {}
    for key, entry in metadata.state_dict_metadata.items():
        if type(entry).__name__ != "TensorStorageMetadata":
            continue
        props = entry.properties
        dtype = props.state[0] if hasattr(props, "state") else props.dtype
        chunks = {tuple(c.offsets): (tuple(c.sizes), locations.get((key, tuple(c.offsets)))) for c in entry.chunks}
        stored[key] = _Stored(dtype, tuple(entry.size), chunks)
    return stored


def _read_into(fd: int, tensor: torch.Tensor, offset: int) -> None:
    view, done = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise ConversionError(f"unexpected end of a torch_dist data file at byte {offset + done}")
        done += count


_LOCAL_HEADER = b"PK\x03\x04"
_RECORD_HEAD = 64 * 1024  # a record's pickle and small entries come before its storage


def _storage_start(fd: int, offset: int, length: int) -> int | None:
    """Where the one storage of a `torch.save` record starts in the file: its zip entry
    `<archive>/data/0` is found by its local header among the record's first bytes, and must be
    stored uncompressed, in little-endian byte order, with no second storage. None otherwise."""
    head = os.pread(fd, min(length, _RECORD_HEAD), offset)
    start, storages, little = None, 0, False
    position = head.find(_LOCAL_HEADER)
    while 0 <= position and position + 30 <= len(head):
        method = struct.unpack("<H", head[position + 8 : position + 10])[0]
        name_length, extra_length = struct.unpack("<HH", head[position + 26 : position + 30])
        name = head[position + 30 : position + 30 + name_length]
        data = position + 30 + name_length + extra_length
        if b"/data/" in name:
            storages += 1
            if method != 0:
                return None
            start = offset + data
            break  # the storage's bytes follow: nothing after it is read
        if name.endswith(b"/byteorder"):
            little = head[data : data + 6] == b"little"
        position = head.find(_LOCAL_HEADER, data)
    return start if storages == 1 and little else None


class _Records:
    """Chunks read straight from DCP's data files: each chunk is a `torch.save` record (a zip)
    whose one storage is stored uncompressed, so it can be mapped rather than deserialised and
    copied. Anything else about a record (transforms, several storages, another byte order,
    another size) leaves the key to DCP's own reader."""

    def __init__(self, directory: Path, stored: dict[str, _Stored]) -> None:
        self._directory = directory
        self._stored = stored
        self._fds: dict[str, int] = {}

    def _fd(self, relative: str) -> int:
        if relative not in self._fds:
            self._fds[relative] = os.open(self._directory / relative, os.O_RDONLY)
        return self._fds[relative]

    def tensor(self, key: str) -> torch.Tensor | None:
        """The key's whole tensor: mapped when it is one chunk; else its chunks read into place."""
        stored = self._stored[key]
        places = {}
        for offsets, (sizes, info) in stored.chunks.items():
            start = self._start(info, stored.dtype, sizes)
            if start is None:
                return None
            places[offsets] = (sizes, info, start)
        if len(places) == 1 and next(iter(places.values()))[0] == stored.size:
            _sizes, info, start = next(iter(places.values()))
            return self._map(info.relative_path, start, stored.dtype, stored.size)
        full = torch.empty(stored.size, dtype=stored.dtype)
        for offsets, (sizes, info, start) in places.items():
            region = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
            if region.is_contiguous():  # one read straight into place, no mapping and copy
                _read_into(self._fd(info.relative_path), region, start)
            else:
                region.copy_(self._map(info.relative_path, start, stored.dtype, sizes))
        return full

    def _start(self, info: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
        """Where the chunk's data starts, if this reader can read the record (else None)."""
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        start = _storage_start(self._fd(info.relative_path), info.offset, info.length)
        if start is None or start + math.prod(shape) * dtype.itemsize > info.offset + info.length:
            return None
        return start

    def _map(self, relative: str, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self._fd(relative), start + count * dtype.itemsize - aligned, offset=aligned, access=mmap.ACCESS_COPY)
        # DCP puts records anywhere in its files, so the data may not be aligned to its dtype.
        return torch.frombuffer(mapped, dtype=dtype, offset=start - aligned, count=count).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _region(piece: Piece) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(piece.offset, piece.chunk_shape))


def _tiling_region(pieces: list[Piece]) -> tuple[slice, ...] | None:
    """The region of their key that `pieces` tile, one after another along one axis and in the
    order of the rows they hold, if they do (then the parameter is a view of its key)."""
    ordered = sorted(pieces, key=lambda p: p.rows[0] if p.rows else 0)
    if len({p.key for p in ordered}) != 1:
        return None
    first, last = ordered[0], ordered[-1]
    axes = [d for d in range(len(first.offset)) if first.offset[d] != last.offset[d]]
    if len(ordered) > 1 and len(axes) != 1:
        return None
    for before, after in zip(ordered, ordered[1:]):
        d = axes[0]
        if after.offset[d] != before.offset[d] + before.chunk_shape[d] or any(
            after.offset[k] != before.offset[k] or after.chunk_shape[k] != before.chunk_shape[k] for k in range(len(before.offset)) if k != d
        ):
            return None
    end = [o + n for o, n in zip(last.offset, last.chunk_shape)]
    return tuple(slice(o, e) for o, e in zip(first.offset, end))


class Reader:
    """Full Megatron tensors (bridge names) read back from a torch_dist checkpoint, one at a time."""

    def __init__(self, bridge: BridgeBase, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            stored = _read_metadata(self.directory)
        except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt .metadata
            raise ConversionError(f"{directory}: not a readable torch_dist checkpoint ({e})") from None
        plan = layout(bridge)
        self._pieces: dict[str, list[Piece]] = {}
        for piece in plan.pieces:
            self._pieces.setdefault(piece.param, []).append(piece)
            if piece.key not in stored:
                raise ConversionError(f"{piece.key}: missing from the torch_dist checkpoint at {directory}")
            if tuple(stored[piece.key].size) != piece.global_shape:
                raise ConversionError(f"{piece.key}: shape {list(stored[piece.key].size)} in {directory}, but the model has {list(piece.global_shape)}")
        unexpected = sorted(set(stored) - {p.key for p in plan.pieces})
        if unexpected:
            raise ConversionError(f"{unexpected[0]}: unexpected tensor in the torch_dist checkpoint at {directory}")
        _expected(bridge, set(self._pieces))
        self._dtypes = {k: v.dtype for k, v in stored.items()}
        self._global = {k: v.size for k, v in stored.items()}
        self._keys: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._records = _Records(self.directory, stored)

    def names(self) -> set[str]:
        return set(self._pieces)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._pieces[name][0].param_shape

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._pieces[name][0].key]

    def file(self, name: str) -> str:
        return "torch_dist"

    def get(self, name: str) -> torch.Tensor:
        """The parameter's full tensor, its chunks taken from their keys and put back in their rows."""
        pieces = self._pieces[name]
        self._load([p.key for p in pieces])
        tiled = _tiling_region(pieces)
        if tiled is not None:  # one region of one key, in row order: a view, no copy
            return self._keys[pieces[0].key][tiled].reshape(pieces[0].param_shape)
        chunks = {p: self._keys[p.key][_region(p)] for p in pieces}
        full = torch.empty(pieces[0].param_shape, dtype=self.dtype(name))
        for piece, chunk in chunks.items():
            full[piece.rows[0] : piece.rows[1]] = chunk.reshape((piece.rows[1] - piece.rows[0], *piece.param_shape[1:]))
        return full

    def _load(self, keys: list[str]) -> None:
        """Read whole checkpoint keys (one DCP read for all missing ones); keep the last few, since
        the parameters of one key (stacked experts) are asked for one after another."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._keys]
        for key in missing:
            direct = self._records.tensor(key)
            if direct is not None:
                self._keys[key] = direct
        missing = [k for k in missing if k not in self._keys]
        if missing:  # records this reader does not map: DCP's own reader
            from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load

            state = {k: torch.empty(self._global[k], dtype=self._dtypes[k]) for k in missing}
            load(state, storage_reader=FileSystemReader(str(self.directory)), planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
            self._keys.update(state)
        for key in keys:
            self._keys.move_to_end(key)
        while len(self._keys) > max(KEY_CACHE, len(set(keys))):
            self._keys.popitem(last=False)
