"""Writing a torch_dist checkpoint chunk by chunk, as PyTorch DCP's FileSystemWriter writes it.

Chunk data is produced only when its record is written (the bridge converts the chunk's group of
HF tensors then), so memory holds one converted group, never the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy
import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import direct, spans
from qwen35_bridge.formats.spans import StoredTensor
from qwen35_bridge.formats.torch_dist import metadata_pickle
from qwen35_bridge.formats.torch_dist.layout import (
    COMMON_STATE_KEY,
    Layout,
    by_key,
    check_coverage,
    layout,
    serialise_common_state,
)
from qwen35_bridge.workers import SINGLE, Workers

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase


def data_file(rank: int) -> str:
    """What PyTorch DCP's FileSystemWriter names rank `rank`'s only data file."""
    return f"__{rank}_0.distcp"


DATA_FILE = data_file(0)


class MegatronSource(Protocol):
    """Where the writer takes Megatron tensors from: a conversion that makes them on demand."""

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | StoredTensor:
        """The tensor `name`, or its rows `[start, stop)`; a `StoredTensor` where its bytes lie
        unchanged in a source file."""
        ...

    def split(self, name: str) -> list[tuple[int, int]] | None:
        """Row ranges to write `name` in, each a chunk of its own (None: whole)."""
        ...


@dataclass(frozen=True)
class Chunk:
    """One chunk of a key to write: a layout piece, or rows of one (a tensor written in parts)."""

    key: str
    param: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    rows: tuple[int, int] | None


def chunks(plan: Layout, source: MegatronSource) -> dict[str, list[Chunk]]:
    """Every key's chunks, in order: its layout pieces, a piece of a tensor written in parts cut
    into one chunk per part (every worker computes the same list from metadata alone)."""
    out: dict[str, list[Chunk]] = {}
    for key, pieces in by_key(plan.pieces).items():
        for piece in pieces:
            ranges = source.split(piece.param) if piece.rows is None else None
            if ranges is None or piece.chunk_shape != piece.param_shape:
                whole = Chunk(key, piece.param, piece.offset, piece.chunk_shape, piece.rows)
                out.setdefault(key, []).append(whole)
                continue
            first, *rest = piece.offset
            out.setdefault(key, []).extend(
                Chunk(key, piece.param, (first + a, *rest), (b - a, *piece.chunk_shape[1:]), (a, b))
                for a, b in ranges
            )
    return out


@dataclass(frozen=True)
class _Record:
    """Where DCP finds a chunk (or a serialised object, `offset` None): in which data file."""

    key: str
    offset: tuple[int, ...] | None
    index: int | None
    file: str
    start: int
    length: int


def write(
    bridge: BridgeBase,
    destination: Path,
    source: MegatronSource,
    dtype_of: Callable[[str], torch.dtype],
    *,
    on_chunk: Callable[[int], None] | None = None,
    common_state: dict[str, Any] | None = None,
    workers: Workers = SINGLE,
    mine: Callable[[str], bool] = lambda _name: True,
) -> int:
    """Write `destination` as a torch_dist checkpoint; `source` gives the Megatron tensors,
    `dtype_of(name)` their dtype. Returns the bytes of tensor data written (by every worker).
    `common_state` replaces the model's (empty) common state: a trainer's run keeps its args,
    checkpoint version and iteration there. With several workers, each writes the chunks of the
    tensors `mine` names into its own data file, and the first the objects and the Metadata.

    The files are exactly those PyTorch DCP's FileSystemWriter writes for this state (objects,
    then each chunk as a `torch.save` record, then the pickled Metadata; a test holds them against
    DCP's own output), with torch.save's zip CRC32 turned off (see below). DCP itself is not
    imported: its import costs as much as a gigabyte of I/O, and the Metadata is pickled with
    stand-ins for its classes (metadata_pickle).
    """
    plan = layout(bridge)
    check_coverage(bridge, plan.params())
    objects = dict(plan.objects) if workers.first else {}
    if common_state is not None and workers.first:
        objects[COMMON_STATE_KEY] = serialise_common_state(common_state)
    planned = chunks(plan, source)
    records: list[_Record] = []
    name = data_file(workers.rank)
    path = Path(destination) / name
    with workers.step():
        try:
            with without_zip_crc32(), direct.open_output(path) as stream:
                for key, payload in objects.items():
                    records.append(_Record(key, None, None, name, stream.tell(), len(payload)))
                    stream.write(payload)
                for key, key_chunks in planned.items():
                    for index, chunk in enumerate(key_chunks):
                        if not mine(chunk.param):
                            continue
                        data = source.tensor(chunk.param, chunk.rows).reshape(chunk.shape)
                        if isinstance(data, StoredTensor):
                            start = _save_stored(data, stream, key, path)
                        else:
                            start = _save(data.contiguous(), stream, key, path)
                        records.append(
                            _Record(key, chunk.offset, index, name, start, stream.tell() - start)
                        )
                        if on_chunk:
                            on_chunk(math.prod(chunk.shape) * data.dtype.itemsize)
        except OSError as e:  # a full disk, a size limit
            raise ConversionError(f"{path}: cannot write it ({e.strerror or e})") from None
    every = [r for rank_records in workers.gather(records) for r in rank_records]
    with workers.step():
        if workers.first:
            metadata = _metadata(planned, every, dtype_of, str(destination), plan)
            staging = Path(destination) / ".metadata.tmp"
            with staging.open("wb") as f:
                metadata_pickle.dump(metadata, f)
            os.replace(staging, Path(destination) / ".metadata")
            (Path(destination) / "metadata.json").write_text(plan.config)
    return sum(
        math.prod(c.shape) * dtype_of(c.param).itemsize for cs in planned.values() for c in cs
    )


def _save(chunk: torch.Tensor, stream: BinaryIO, key: str, path: Path) -> int:
    """One chunk as a `torch.save` record at the end of `stream`; returns where it starts."""
    # torch.save writes whole storages: give the chunk one of its own size
    if chunk.untyped_storage().nbytes() != chunk.numel() * chunk.element_size():
        chunk = _own_storage(chunk)
    start = stream.tell()
    try:
        torch.save(chunk, stream)
    except RuntimeError:  # how torch's zip writer reports a short write
        raise ConversionError(
            f"{key}: cannot write it to {path} (the write stopped short: a full disk or a file "
            "size limit)"
        ) from None
    return start


def _save_stored(stored: StoredTensor, stream: BinaryIO, key: str, path: Path) -> int:
    """A chunk that lies in a source file, as the same `torch.save` record as `_save` writes, its
    data copied file to file unread: torch.save writes a stand-in tensor of the chunk's dtype and
    shape, never filled, and where it writes the stand-in's bytes the chunk's are copied."""
    if stored.nbytes == 0:
        return _save(torch.empty(stored.shape, dtype=stored.dtype), stream, key, path)
    stand_in = torch.empty(stored.shape, dtype=stored.dtype)
    substituting = _Substituting(stream, stand_in, stored)
    start = stream.tell()
    try:
        torch.save(stand_in, substituting)
    except RuntimeError:  # how torch's zip writer reports a failed write
        if isinstance(substituting.failure, ConversionError):
            raise ConversionError(f"{key}: {substituting.failure}") from None
        raise ConversionError(
            f"{key}: cannot write it to {path} (the write stopped short: a full disk or a file "
            "size limit)"
        ) from None
    if not substituting.copied:  # never the case with torch's writer: its layout changed
        raise ConversionError(f"{key}: torch.save did not write its data as one piece")
    return start


class _Substituting:
    """A file for torch.save that writes everything as given, except the stand-in tensor's
    bytes (recognised by their address and size): those it copies from where the chunk lies.
    Any other write touching the stand-in's memory is refused, so that its unfilled bytes can
    never reach the file."""

    def __init__(self, file: BinaryIO, stand_in: torch.Tensor, stored: StoredTensor) -> None:
        self._file, self._stored = file, stored
        self._address, self._nbytes = stand_in.data_ptr(), stored.nbytes
        self.copied = False
        self.failure: BaseException | None = None  # torch.save reports it as a RuntimeError

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        address = numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data if view.nbytes else 0
        try:
            if (address, view.nbytes) == (self._address, self._nbytes) and not self.copied:
                spans.append(self._stored.spans, self._file)
                self.copied = True
            elif address < self._address + self._nbytes and self._address < address + view.nbytes:
                raise ConversionError("torch.save wrote a chunk's data in pieces")
            else:
                self._file.write(view)
        except BaseException as e:
            self.failure = e
            raise
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()


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
    planned: dict[str, list[Chunk]],
    records: list[_Record],
    dtype_of: Callable[[str], torch.dtype],
    checkpoint_id: str,
    plan: Layout,
) -> Any:
    """DCP's Metadata for the records, as its default planner and FileSystemWriter make it."""
    global_shapes = {p.key: p.global_shape for p in plan.pieces}
    state = {
        key: metadata_pickle.tensor_storage(
            dtype_of(key_chunks[0].param),
            global_shapes[key],
            [(c.offset, c.shape) for c in key_chunks],
        )
        for key, key_chunks in planned.items()
    }
    for record in records:
        if record.offset is None:
            state[record.key] = metadata_pickle.bytes_storage()
    storage = {
        metadata_pickle.storage_index(r.key, r.offset, r.index): metadata_pickle.storage_info(
            r.file, r.start, r.length
        )
        for r in records
    }
    return metadata_pickle.metadata(state, storage, checkpoint_id)
