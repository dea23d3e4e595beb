"""Megatron `torch_dist` checkpoints, written from HF tensors and read back, without the model's
weights in memory.

The checkpoint's layout is megatron-core's own: the model is built on the meta device (no memory),
and its `sharded_state_dict()` says which keys, shapes and chunks a checkpoint holds, including the
factories that store GDN in_proj and conv1d as separate sections, GLU fc1 halves and stacked
experts (FACTS.md sections 5 to 7). Tensor data is produced only when PyTorch Distributed
Checkpoint writes that chunk: the bridge converts the chunk's group of HF tensors then, so memory
holds a few groups, never the model. Reading runs the factories' merges in reverse, one group at a
time. The files are what `megatron.core.dist_checkpointing.save` writes, and load with
`dist_checkpointing.load(model.sharded_state_dict(), path)` at any TP/EP.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codegen.errors import ConversionError
from codegen.runtime.bridge import BridgeBase
from codegen.runtime.mappings import Group

BACKEND, BACKEND_VERSION = "torch_dist", 1
GROUP_CACHE = 3  # converted groups kept: DCP writes chunks largest first, not group by group


@dataclass(frozen=True)
class Piece:
    """One chunk of a checkpoint key, and where its data comes from: the Megatron parameter
    `param` (a bridge name), cut by `factory` when the parameter is stored in parts."""

    key: str
    offset: tuple[int, ...]
    param: str
    sharded: Any  # megatron ShardedTensor with meta data: shapes and offsets
    factory: Any | None


@dataclass
class Layout:
    pieces: list[Piece]
    objects: dict[str, Any]  # ShardedObjects by unique key: extra state and the common state

    def params(self) -> set[str]:
        return {p.param for p in self.pieces}


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


def layout_of(model: torch.nn.Module, prefix: str) -> Layout:
    """The checkpoint layout of a model built at TP=PP=EP=1, whose names are the global ones."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    _, state = extract_nonpersistent(model.sharded_state_dict())
    sharded, common = extract_sharded_base(state)
    pieces: list[Piece] = []
    objects: dict[str, Any] = {}
    for path, value in _walk(sharded):
        if isinstance(value, ShardedObject):
            objects[value.unique_key] = value
        elif isinstance(value, ShardedTensorFactory):
            for _, built in _walk(value.build()):
                pieces.append(Piece(built.key, tuple(built.global_offset), prefix + path, built, value))
        elif isinstance(value, ShardedTensor):
            pieces.append(Piece(value.key, tuple(value.global_offset), prefix + path, value, None))
        else:
            raise ConversionError(f"{path}: unexpected {type(value).__name__} in the sharded state dict")
    common_state = ShardedObject(key="common_state", data=common, global_shape=(1,), global_offset=(0,), replica_id=0)
    objects[common_state.unique_key] = common_state
    return Layout(pieces, objects)


def _chunk_of(piece: Piece, full: torch.Tensor) -> torch.Tensor:
    """The piece's data, given its parameter's full tensor."""
    if piece.factory is None:
        data = full
    else:
        built = piece.factory.build_fn(piece.factory.key, full, piece.factory.replica_id, piece.factory.flattened_range)
        matches = [t for _, t in _walk(built) if t.key == piece.key and tuple(t.global_offset) == piece.offset]
        data = matches[0].data
    return data.reshape(_chunk_shape(piece.sharded)).contiguous()


def _chunk_shape(sharded: Any) -> tuple[int, ...]:
    """What the chunk is on disk: experts stored stacked carry a leading axis of one."""
    return (1,) * sharded.prepend_axis_num + tuple(sharded.local_shape)


def _stored(sharded: Any) -> Any:
    """The ShardedTensor as it is stored: the prepended axes made explicit."""
    if not sharded.prepend_axis_num:
        return sharded
    shape = _chunk_shape(sharded)
    return dataclasses.replace(sharded, data=sharded.data.reshape(shape), local_shape=shape, prepend_axis_num=0)


class _GroupCache:
    """Converted groups, least recently used dropped first."""

    def __init__(self, convert: Callable[[Group], dict[str, torch.Tensor]], groups: tuple[Group, ...], side: str) -> None:
        self._convert = convert
        self._group_of = {name: g for g in groups for name in getattr(g, side)}
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


def write(
    bridge: BridgeBase,
    model: torch.nn.Module,
    destination: Path,
    convert: Callable[[Group], dict[str, torch.Tensor]],
    *,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Write `destination` as a torch_dist checkpoint; `convert(group)` gives a group's Megatron
    tensors. Returns the number of bytes of tensor data written."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.checkpointable import CheckpointableShardedTensor, LocalShardsContainer
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint import FileSystemWriter, save

    prefix = bridge._prefix(model)
    layout = layout_of(model, prefix)
    expected = {name for name in bridge.megatron_shapes if name.startswith(prefix)}
    _check_coverage(layout.params(), expected)
    cache = _GroupCache(convert, bridge.groups, "megatron")
    written = [0]

    class LazyChunk(CheckpointableShardedTensor):
        """Produces its data when DCP writes it."""

        def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
            piece = self._piece
            data = _chunk_of(piece, cache.tensor(piece.param))
            written[0] += data.numel() * data.element_size()
            if on_chunk:
                on_chunk(data.numel() * data.element_size())
            return data

    by_key: dict[str, list[Any]] = {}
    for piece in layout.pieces:
        stored = _stored(piece.sharded)
        chunk = LazyChunk(stored.data, stored)
        chunk._piece = piece
        by_key.setdefault(piece.key, []).append(chunk)
    state: dict[str, Any] = {k: v[0] if len(v) == 1 else LocalShardsContainer(v) for k, v in by_key.items()}
    for key, obj in layout.objects.items():
        buffer = io.BytesIO()
        torch.save([obj.data], buffer)  # as megatron-core serialises ShardedObjects
        state[key] = buffer
    writer = FileSystemWriter(destination, single_file_per_rank=True, sync_files=False, thread_count=1)
    save(state, storage_writer=writer, planner=MCoreSavePlanner(flatten_state_dict=False), no_dist=True)
    save_config(CheckpointingConfig(BACKEND, BACKEND_VERSION), str(destination))
    return written[0]


class Reader:
    """Full Megatron tensors (bridge names) read back from a torch_dist checkpoint."""

    def __init__(self, bridge: BridgeBase, model: torch.nn.Module, directory: Path) -> None:
        from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import CachedMetadataFileSystemReader

        self.directory = Path(directory)
        self._storage = CachedMetadataFileSystemReader(str(directory))
        try:
            metadata = self._storage.read_metadata()
        except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt .metadata
            raise ConversionError(f"{directory}: not a readable torch_dist checkpoint ({e})") from None
        stored = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        prefix = bridge._prefix(model)
        self.layout = layout_of(model, prefix)
        self._pieces: dict[str, list[Piece]] = {}
        for piece in self.layout.pieces:
            self._pieces.setdefault(piece.param, []).append(piece)
            if piece.key not in stored:
                raise ConversionError(f"{piece.key}: missing from the torch_dist checkpoint at {directory}")
            if tuple(stored[piece.key].size) != tuple(piece.sharded.global_shape):
                raise ConversionError(f"{piece.key}: shape {list(stored[piece.key].size)} in {directory}, but the model has {list(piece.sharded.global_shape)}")
        unexpected = sorted(set(stored) - {p.key for p in self.layout.pieces})
        if unexpected:
            raise ConversionError(f"{unexpected[0]}: unexpected tensor in the torch_dist checkpoint at {directory}")
        self._dtypes = {k: v.properties.dtype for k, v in stored.items()}
        self._shapes = {name: _param_shape(pieces[0]) for name, pieces in self._pieces.items()}
        expected = {name for name in bridge.megatron_shapes if name.startswith(prefix)}
        _check_coverage(set(self._pieces), expected)

    def names(self) -> set[str]:
        return set(self._pieces)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shapes[name])

    def file(self, name: str) -> str:
        return "torch_dist"

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._pieces[name][0].key]

    def get(self, name: str) -> torch.Tensor:
        """The parameter's full tensor: its chunks loaded, then merged by its factory."""
        from megatron.core.dist_checkpointing.strategies.checkpointable import CheckpointableShardedTensor, LocalShardsContainer
        from torch.distributed.checkpoint import DefaultLoadPlanner, load

        pieces = self._pieces[name]
        targets: dict[str, list[Any]] = {}
        buffers = []
        for piece in pieces:
            stored = _stored(piece.sharded)
            buffer = torch.empty(stored.local_shape, dtype=self._dtypes[piece.key])
            targets.setdefault(piece.key, []).append(CheckpointableShardedTensor.from_sh_ten(dataclasses.replace(stored, data=buffer)))
            buffers.append(buffer)
        state = {k: v[0] if len(v) == 1 else LocalShardsContainer(v) for k, v in targets.items()}
        load(state, storage_reader=self._storage, planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
        factory = pieces[0].factory
        if factory is None:
            return buffers[0].reshape(pieces[0].sharded.local_shape)
        return factory.merge_fn(_fill(factory, pieces, buffers))


def _param_shape(piece: Piece) -> tuple[int, ...]:
    """The shape of the Megatron tensor a piece belongs to (as this TP=1 model holds it)."""
    source = piece.factory.data if piece.factory is not None else piece.sharded.data
    return tuple(source.shape)


def _fill(factory: Any, pieces: list[Piece], buffers: list[torch.Tensor]) -> Any:
    """The factory's sub-state-dict (its structure, as built) holding the loaded chunks."""
    loaded = {(p.key, p.offset): b.reshape(p.sharded.local_shape) for p, b in zip(pieces, buffers)}
    template = factory.build_fn(factory.key, torch.empty(factory.data.shape, dtype=buffers[0].dtype, device="meta"), factory.replica_id, factory.flattened_range)

    def replace(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: replace(v) for k, v in node.items()}
        if isinstance(node, list):
            return [replace(v) for v in node]
        return loaded[(node.key, tuple(node.global_offset))]

    return replace(template)


def _check_coverage(found: set[str], expected: set[str]) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise ConversionError(f"{missing[0]}: mapped by the bridge but not part of the torch_dist layout")
    if extra:
        raise ConversionError(f"{extra[0]}: part of the torch_dist layout but not mapped by the bridge")
