"""Writing a torch_dist checkpoint chunk by chunk, as PyTorch DCP's FileSystemWriter writes it.

Chunk data is produced only when its record is written (the bridge converts the chunk's group of
HF tensors then), so memory holds one converted group, never the model.
"""

from __future__ import annotations

import importlib
import os
import pickle
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.torch_dist.layout import (
    COMMON_STATE_KEY,
    Piece,
    by_key,
    check_coverage,
    layout,
    serialise_common_state,
)
from qwen35_bridge.mapping.kinds import Group

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase

GROUP_CACHE = (
    1  # converted groups kept while writing (chunks are written key by key, group by group)
)


DATA_FILE = "__0_0.distcp"  # what PyTorch DCP's FileSystemWriter names a single rank's only file


def chunk_of(piece: Piece, full: torch.Tensor) -> torch.Tensor:
    data = full if piece.rows is None else full[piece.rows[0] : piece.rows[1]]
    return data.reshape(piece.chunk_shape)


class _GroupCache:
    """Converted groups, least recently used dropped first."""

    def __init__(
        self, convert: Callable[[Group], dict[str, torch.Tensor]], groups: tuple[Group, ...]
    ) -> None:
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
    common_state: dict[str, Any] | None = None,
) -> int:
    """Write `destination` as a torch_dist checkpoint; `convert(group)` gives a group's Megatron
    tensors, `dtype_of(name)` their dtype. Returns the bytes of tensor data written.
    `common_state` replaces the model's (empty) common state: a trainer's run keeps its args,
    checkpoint version and iteration there.

    The files are exactly those PyTorch DCP's FileSystemWriter writes for this state on one rank
    (objects, then each chunk as a `torch.save` record, then the pickled Metadata; a test holds
    them against DCP's own output), with torch.save's zip CRC32 turned off (see below). Writing the records here lets DCP's import, which costs as
    much as a gigabyte of I/O, run in the background meanwhile: only the Metadata needs it.
    """
    plan = layout(bridge)
    check_coverage(bridge, plan.params())
    objects = dict(plan.objects)
    if common_state is not None:
        objects[COMMON_STATE_KEY] = serialise_common_state(common_state)
    dcp = _BackgroundImport("torch.distributed.checkpoint")
    cache = _GroupCache(convert, bridge.groups)
    keys = by_key(plan.pieces)
    records: list[_Record] = []
    written = 0
    data_file = Path(destination) / DATA_FILE
    try:
        with without_zip_crc32(), data_file.open("wb") as stream:
            for key, payload in objects.items():
                records.append(_Record(key, None, None, stream.tell(), len(payload)))
                stream.write(payload)
            for key, pieces in keys.items():
                for index, piece in enumerate(pieces):
                    chunk = chunk_of(piece, cache.tensor(piece.param)).contiguous()
                    # torch.save writes whole storages: give the chunk one of its own size
                    if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
                        chunk = _own_storage(chunk)
                    start = stream.tell()
                    try:
                        torch.save(chunk, stream)
                    except RuntimeError:  # how torch's zip writer reports a short write
                        raise ConversionError(
                            f"{key}: cannot write it to {data_file} (the write stopped short: "
                            "a full disk or a file size limit)"
                        ) from None
                    records.append(_Record(key, piece.offset, index, start, stream.tell() - start))
                    written += chunk.numel() * chunk.element_size()
                    if on_chunk:
                        on_chunk(chunk.numel() * chunk.element_size())
    except OSError as e:  # a full disk, a size limit
        raise ConversionError(f"{data_file}: cannot write it ({e.strerror or e})") from None
    metadata = _metadata(dcp.module(), keys, records, dtype_of, str(destination))
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
def without_zip_crc32() -> Iterator[None]:
    """torch.save's zip CRC32 costs about 2.5 s per GB on these machines, and torch.load (so DCP
    and megatron-core) never checks it: records are written without it (torch's own option)."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def _metadata(
    dcp: Any,
    keys: dict[str, list[Piece]],
    records: list[_Record],
    dtype_of: Callable[[str], torch.dtype],
    checkpoint_id: str,
) -> Any:
    """DCP's Metadata for the records, as its default planner and FileSystemWriter make it."""
    md, filesystem = dcp.metadata, dcp.filesystem
    state: dict[str, Any] = {}
    for key, pieces in keys.items():
        chunks = [
            md.ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=torch.Size(p.chunk_shape))
            for p in pieces
        ]
        state[key] = md.TensorStorageMetadata(
            md.TensorProperties(dtype=dtype_of(pieces[0].param)),
            torch.Size(pieces[0].global_shape),
            chunks,
        )
    for record in records:
        if record.offset is None:
            state[record.key] = md.BytesStorageMetadata()
    storage = {
        md.MetadataIndex(
            r.key, None if r.offset is None else torch.Size(r.offset), r.index
        ): filesystem._StorageInfo(DATA_FILE, r.start, r.length)
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
