"""Reading a torch_dist checkpoint back, one Megatron tensor at a time, without importing DCP.

`.metadata` is read with stand-in classes, and each chunk's storage is found in its `torch.save`
record and read into place; DCP's own reader serves any record this one does not understand.
"""

from __future__ import annotations

import bisect
import io
import math
import mmap
import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.storage import _get_dtype_from_pickle_storage_type

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.buffers import ReadBuffers
from qwen35_bridge.formats.megatron_lm import padded_vocabulary, padding_note
from qwen35_bridge.formats.spans import Span, StoredTensor
from qwen35_bridge.formats.torch_dist.layout import Piece, check_coverage, layout

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase


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
    locations = {
        (i.fqn, tuple(i.offset)): info
        for i, info in metadata.storage_data.items()
        if getattr(i, "offset", None) is not None
    }
    stored = {}
    for key, entry in metadata.state_dict_metadata.items():
        if type(entry).__name__ != "TensorStorageMetadata":
            continue
        props = entry.properties
        dtype = props.state[0] if hasattr(props, "state") else props.dtype
        chunks = {
            tuple(c.offsets): (tuple(c.sizes), locations.get((key, tuple(c.offsets))))
            for c in entry.chunks
        }
        stored[key] = _Stored(dtype, tuple(entry.size), chunks)
    return stored


def _read_into(fd: int, tensor: torch.Tensor, offset: int) -> None:
    view, done = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise ConversionError(
                f"unexpected end of a torch_dist data file at byte {offset + done}"
            )
        done += count


_LOCAL_HEADER = b"PK\x03\x04"
_RECORD_HEAD = 64 * 1024  # a record's pickle and small entries come before its storage
_RECORD_PEEK = 4 * 1024  # where they almost always end: read first, the rest only if needed


def _storage_start(fd: int, offset: int, length: int) -> tuple[int, torch.dtype, int] | None:
    """Where the one storage of a `torch.save` record starts in the file, with its dtype and
    number of elements as the record's pickle gives them: its zip entry `<archive>/data/0` is found
    by its local header among the record's first bytes, and must be stored uncompressed, in
    little-endian byte order, with no second storage. None otherwise."""
    if length > _RECORD_PEEK:
        found = _find_storage(os.pread(fd, _RECORD_PEEK, offset), offset)
        if found is not None:
            return found
    return _find_storage(os.pread(fd, min(length, _RECORD_HEAD), offset), offset)


def _find_storage(head: bytes, offset: int) -> tuple[int, torch.dtype, int] | None:
    """`_storage_start` within `head`, the first bytes of the record at `offset`."""
    start, storages, little, storage = None, 0, False, None
    position = head.find(_LOCAL_HEADER)
    while 0 <= position and position + 30 <= len(head):
        method = struct.unpack("<H", head[position + 8 : position + 10])[0]
        name_length, extra_length = struct.unpack("<HH", head[position + 26 : position + 30])
        name = head[position + 30 : position + 30 + name_length]
        data = position + 30 + name_length + extra_length
        if name.endswith(b"/data.pkl") and method == 0:
            storage = _pickled_storage(head[data:])
        if b"/data/" in name:
            storages += 1
            if method != 0:
                return None
            start = offset + data
            break  # the storage's bytes follow: nothing after it is read
        if name.endswith(b"/byteorder"):
            little = head[data : data + 6] == b"little"
        position = head.find(_LOCAL_HEADER, data)
    if start is None or storages != 1 or not little or storage is None:
        return None
    return start, *storage


class _StoragePeek(pickle.Unpickler):
    """Reads a record's pickle only for its storage's (type, numel); builds nothing else."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[str, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return name
        return lambda *args, **kwargs: None

    def persistent_load(self, pid: Any) -> None:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            self.storages.append((pid[1], pid[4]))


def _pickled_storage(data: bytes) -> tuple[torch.dtype, int] | None:
    peek = _StoragePeek(data)
    try:
        peek.load()
        (type_name, numel), *more = peek.storages
        dtype = _get_dtype_from_pickle_storage_type(type_name)  # e.g. FloatStorage: float32
    except Exception:  # noqa: BLE001 - anything unexpected leaves the record to DCP's reader
        return None
    return None if more else (dtype, numel)


def _check_chunks(key: str, stored: _Stored, directory: Path) -> None:
    """The key's chunks tile its tensor exactly (inside it, not overlapping, covering it), each
    with data in the checkpoint: nothing is left as whatever memory held before."""
    total = 0
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # those reaching the next chunk
    for offsets, (sizes, info) in sorted(stored.chunks.items()):
        if len(offsets) != len(stored.size) or len(sizes) != len(stored.size):
            raise ConversionError(f"{key}: a chunk of the wrong rank in {directory}/.metadata")
        if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, stored.size)):
            raise ConversionError(
                f"{key}: chunk at {list(offsets)} of size {list(sizes)} lies outside its tensor "
                f"{list(stored.size)} in {directory}/.metadata"
            )
        if info is None:
            raise ConversionError(
                f"{key}: chunk at {list(offsets)} has no data in the torch_dist checkpoint at {directory}"
            )
        if offsets:  # in order of the first offset, a chunk ending before this one is past
            boxes = [(o, n) for o, n in boxes if o[0] + n[0] > offsets[0]]
        for other_offsets, other_sizes in boxes:
            if all(
                a < b + m and b < a + n
                for a, n, b, m in zip(offsets, sizes, other_offsets, other_sizes)
            ):
                raise ConversionError(
                    f"{key}: chunks at {list(other_offsets)} and {list(offsets)} overlap in {directory}/.metadata"
                )
        boxes.append((offsets, sizes))
        total += math.prod(sizes)
    if total != math.prod(stored.size):
        raise ConversionError(
            f"{key}: its chunks hold {total} of its {math.prod(stored.size)} values in {directory}/.metadata"
        )


class _Records:
    """Chunks read straight from DCP's data files: each chunk is a `torch.save` record (a zip)
    whose one storage is stored uncompressed, so it can be mapped rather than deserialised and
    copied. Anything else about a record (transforms, several storages, another byte order,
    another size) leaves the key to DCP's own reader."""

    def __init__(self, directory: Path, stored: dict[str, _Stored]) -> None:
        self._directory = directory
        self._stored = stored
        self._fds: dict[str, int] = {}
        self._buffers = ReadBuffers()
        self._sorted: dict[str, tuple[list[int], list[tuple[tuple[int, ...], Any]], int]] = {}

    def _fd(self, relative: str) -> int:
        if relative not in self._fds:
            try:
                self._fds[relative] = os.open(self._directory / relative, os.O_RDONLY)
            except OSError as e:
                raise ConversionError(
                    f"{self._directory / relative}: cannot open this torch_dist data file ({e.strerror})"
                ) from None
        return self._fds[relative]

    def region(
        self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]
    ) -> torch.Tensor | None:
        """The region of the key's tensor at `offset` of `shape`, from the chunks that hold it
        and only those: mapped when it is exactly one chunk; else those chunks read into place.
        None if a chunk's record is one this reader does not read (DCP's reader then serves)."""
        stored = self._stored[key]
        places = []
        for offsets, (sizes, info) in self._near(key, offset, shape):
            if not _overlap(offsets, sizes, offset, shape):
                continue
            start = self._start(key, info, stored.dtype, sizes)
            if start is None:
                return None
            places.append((offsets, sizes, info, start))
        if len(places) == 1 and places[0][:2] == (tuple(offset), tuple(shape)):
            _offsets, sizes, info, start = places[0]
            return self._map(info.relative_path, start, stored.dtype, sizes)
        out = self._buffers.empty(tuple(shape), stored.dtype)
        for offsets, sizes, info, start in places:
            inside = tuple(
                slice(max(o, r) - r, min(o + n, r + m) - r)
                for o, n, r, m in zip(offsets, sizes, offset, shape)
            )
            target = out[inside]
            whole = all(
                o >= r and o + n <= r + m for o, n, r, m in zip(offsets, sizes, offset, shape)
            )
            if whole and target.is_contiguous():  # one read straight into place
                _read_into(self._fd(info.relative_path), target, start)
                continue
            chunk = self._map(info.relative_path, start, stored.dtype, sizes)
            target.copy_(
                chunk[
                    tuple(
                        slice(max(o, r) - o, min(o + n, r + m) - o)
                        for o, n, r, m in zip(offsets, sizes, offset, shape)
                    )
                ]
            )
        return out

    def _near(
        self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]
    ) -> list[tuple[tuple[int, ...], Any]]:
        """The key's chunks that may overlap the region: those starting, along the first
        dimension, within the longest chunk's reach of it (found by bisection in the chunks
        sorted once per key: a layer's experts are a thousand chunks of one key)."""
        if key not in self._sorted:
            chunks = sorted(self._stored[key].chunks.items())
            starts = [offsets[0] if offsets else 0 for offsets, _ in chunks]
            reach = max((sizes[0] for _, (sizes, _) in chunks if sizes), default=1)
            self._sorted[key] = (starts, chunks, reach)
        starts, chunks, reach = self._sorted[key]
        if not offset:
            return chunks
        low = bisect.bisect_left(starts, offset[0] - reach + 1)
        return chunks[low : bisect.bisect_left(starts, offset[0] + shape[0])]

    def spans(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> list[Span] | None:
        """Where the bytes of the key's region at `offset` of `shape` lie, in order: each part of
        it a chunk holds must be one run of bytes both in the chunk and in the region (whole
        chunks one after another, or rows of one chunk). None otherwise, or where a chunk's
        record is one this reader does not read."""
        stored = self._stored[key]
        found = []
        for offsets, (sizes, info) in self._near(key, offset, shape):
            if not _overlap(offsets, sizes, offset, shape):
                continue
            low = tuple(max(o, r) for o, r in zip(offsets, offset))
            high = tuple(min(o + n, r + m) for o, n, r, m in zip(offsets, sizes, offset, shape))
            in_chunk = _run_start(low, high, offsets, sizes)
            in_region = _run_start(low, high, offset, shape)
            start = self._start(key, info, stored.dtype, sizes)
            if in_chunk is None or in_region is None or start is None:
                return None
            nbytes = math.prod(b - a for a, b in zip(low, high)) * stored.dtype.itemsize
            at = start + in_chunk * stored.dtype.itemsize
            path = str(self._directory / info.relative_path)
            found.append((in_region, Span(self._fd(info.relative_path), at, nbytes, path)))
        return [span for _start, span in sorted(found, key=lambda f: f[0])]

    def _start(self, key: str, info: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> int | None:
        """Where the chunk's data starts, if this reader can read the record (else None). A record
        whose storage is not of the dtype .metadata names, or too small for the chunk, is an error:
        its bytes would be read as other values."""
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        found = _storage_start(self._fd(info.relative_path), info.offset, info.length)
        if found is None:
            return None
        start, stored_dtype, numel = found
        if stored_dtype != dtype or numel < math.prod(shape):
            raise ConversionError(
                f"{key}: .metadata says a chunk of {list(shape)} {dtype}, but its record in "
                f"{info.relative_path} holds {numel} {stored_dtype}; .metadata and the data disagree"
            )
        if start + math.prod(shape) * dtype.itemsize > info.offset + info.length:
            raise ConversionError(f"{key}: its record in {info.relative_path} ends before its data")
        return start

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Memory for a tensor put together from chunks: a buffer no tensor uses any more, where
        there is one (fresh memory costs a page fault per page)."""
        return self._buffers.empty(shape, dtype)

    def _map(
        self, relative: str, start: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(
                self._fd(relative),
                start + count * dtype.itemsize - aligned,
                offset=aligned,
                access=mmap.ACCESS_COPY,
            )
        except ValueError:  # the mapping would reach past the end of the file
            raise ConversionError(
                f"{self._directory / relative}: truncated; a record's data reaches past its end"
            ) from None
        # DCP puts records anywhere in its files, so the data may not be aligned to its dtype.
        return torch.frombuffer(mapped, dtype=dtype, offset=start - aligned, count=count).reshape(
            shape
        )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buffers.clear()


def _overlap(
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    offset: tuple[int, ...],
    shape: tuple[int, ...],
) -> bool:
    return all(o < r + m and r < o + n for o, n, r, m in zip(offsets, sizes, offset, shape))


def _run_start(
    low: tuple[int, ...], high: tuple[int, ...], origin: tuple[int, ...], sizes: tuple[int, ...]
) -> int | None:
    """The element at which box `[low, high)` starts in the row-major tensor of `sizes` placed
    at `origin`, if the box is one run of its elements there (every dimension after the last
    partial one whole, every one before it a single index); None if it is not."""
    extents = [b - a for a, b in zip(low, high)]
    partial = [d for d, (n, size) in enumerate(zip(extents, sizes)) if n != size]
    if partial and any(n != 1 for n in extents[: partial[-1]]):
        return None
    start, stride = 0, 1
    for d in reversed(range(len(sizes))):
        start += (low[d] - origin[d]) * stride
        stride *= sizes[d]
    return start


def _next_along(before: tuple[slice, ...], after: tuple[slice, ...]) -> int | None:
    """The axis along which region `after` directly follows `before` (every other axis the
    same), if it does."""
    differ = [d for d, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(differ) != 1:
        return None
    d = differ[0]
    if after[d].start != before[d].stop or after[d].stop - after[d].start != (
        before[d].stop - before[d].start
    ):
        return None
    return d


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
            after.offset[k] != before.offset[k] or after.chunk_shape[k] != before.chunk_shape[k]
            for k in range(len(before.offset))
            if k != d
        ):
            return None
    end = [o + n for o, n in zip(last.offset, last.chunk_shape)]
    return tuple(slice(o, e) for o, e in zip(first.offset, end))


#: Keys of a trainer's checkpoint that are not the model: optimizer moments and master weights
#: (`optimizer.state.exp_avg.<param>`, `chained_0.optimizer...` for chained optimizers) and RNG.
TRAINING_STATE = re.compile(r"^(?:chained_\d+\.)?optimizer\.|^rng_state")


def is_training_state(key: str) -> bool:
    return TRAINING_STATE.match(key) is not None


class Reader:
    """Full Megatron tensors (bridge names) read back from a torch_dist checkpoint, one at a time."""

    def __init__(self, bridge: BridgeBase, directory: Path, *, training: bool = False) -> None:
        """`training`: the checkpoint is a trainer's, whose optimizer state (and RNG state)
        keys are left out on purpose, never read, and counted in `ignored`."""
        self.directory = Path(directory)
        try:
            stored = _read_metadata(self.directory)
        except Exception as e:  # noqa: BLE001 - a missing, truncated or corrupt .metadata
            raise ConversionError(
                f"{directory}: not a readable torch_dist checkpoint ({e})"
            ) from None
        self.ignored = sorted(k for k in stored if training and is_training_state(k))
        for key in self.ignored:
            del stored[key]
        self.notes: list[str] = []
        plan = layout(bridge)
        self._pieces: dict[str, list[Piece]] = {}
        for piece in plan.pieces:
            self._pieces.setdefault(piece.param, []).append(piece)
            if piece.key not in stored:
                raise ConversionError(
                    f"{piece.key}: missing from the torch_dist checkpoint at {directory}"
                )
            found = tuple(stored[piece.key].size)
            if found == piece.global_shape:
                continue
            if (
                training
                and piece.rows is None
                and padded_vocabulary(bridge.splits[piece.param], found, piece.global_shape)
            ):  # a trainer's padded vocabulary: the chunk reads the model's rows only
                if (note := padding_note(found[0], piece.global_shape[0])) not in self.notes:
                    self.notes.append(note)
                continue
            raise ConversionError(
                f"{piece.key}: shape {list(found)} in {directory}, but the model has {list(piece.global_shape)}"
            )
        unexpected = sorted(set(stored) - {p.key for p in plan.pieces})
        if unexpected:
            raise ConversionError(
                f"{unexpected[0]}: unexpected tensor in the torch_dist checkpoint at {directory}"
            )
        check_coverage(bridge, set(self._pieces))
        for key, entry in stored.items():
            _check_chunks(key, entry, self.directory)
        self._dtypes = {k: v.dtype for k, v in stored.items()}
        self._global = {k: v.size for k, v in stored.items()}
        self._keys: dict[str, torch.Tensor] = {}  # a key DCP's reader read whole
        self._records = _Records(self.directory, stored)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the data files and lets go of the keys and buffers kept."""
        self._keys.clear()
        self._records.close()

    def names(self) -> set[str]:
        return set(self._pieces)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._pieces[name][0].param_shape

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[self._pieces[name][0].key]

    def file(self, name: str) -> str:
        return "torch_dist"

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The parameters; those stored one after another in one key (a layer's experts) are
        read as one region, into one buffer, so that they stay views of one stack."""
        out: dict[str, torch.Tensor] = {}
        for run in self._stacked_runs(names):
            if len(run) == 1:
                out[run[0]] = self.get(run[0])
                continue
            first, last = self._whole_region(run[0]), self._whole_region(run[-1])
            assert first is not None and last is not None
            offset = tuple(a.start for a in first)
            shape = tuple(b.stop - a.start for a, b in zip(first, last))
            region = self._region(self._pieces[run[0]][0].key, offset, shape)
            stack = region.reshape(len(run), *self.shape(run[0]))
            out.update(zip(run, stack.unbind(0)))
        return out

    def _stacked_runs(self, names: list[str]) -> list[list[str]]:
        """`names` cut into runs of parameters that each fill a region of one key, the regions
        one after another along one axis in the order asked; any other parameter is a run of its
        own."""
        runs: list[list[str]] = []
        axis: int | None = None
        for name in names:
            here = self._whole_region(name)
            if here is not None and runs and self._whole_region(runs[-1][-1]) is not None:
                before = runs[-1][-1]
                step = _next_along(self._whole_region(before), here)
                same = (
                    self._pieces[before][0].key == self._pieces[name][0].key
                    and self.shape(before) == self.shape(name)
                )
                if same and step is not None and (len(runs[-1]) == 1 or step == axis):
                    runs[-1].append(name)
                    axis = step
                    continue
            runs.append([name])
        return runs

    def _whole_region(self, name: str) -> tuple[slice, ...] | None:
        """The region of its key that the parameter fills, its pieces in row order (then its
        tensor is that region, reshaped), if it does."""
        pieces = self._pieces[name]
        region = _tiling_region(pieces)
        if region is None:
            return None
        numel = math.prod(s.stop - s.start for s in region)
        return region if numel == math.prod(pieces[0].param_shape) else None

    def get(self, name: str) -> torch.Tensor:
        """The parameter's full tensor, from the chunks that hold its pieces (nothing else of their
        keys is read), its pieces put back in their rows."""
        pieces = self._pieces[name]
        shape, tiled = pieces[0].param_shape, _tiling_region(pieces)
        if tiled is not None:  # one region of one key, in row order: read as it lies
            offset = tuple(s.start for s in tiled)
            return self._region(
                pieces[0].key, offset, tuple(s.stop - s.start for s in tiled)
            ).reshape(shape)
        full = self._records.empty(shape, self.dtype(name))  # memory a dropped parameter left
        for piece in pieces:
            chunk = self._region(piece.key, piece.offset, piece.chunk_shape)
            rows = (piece.rows[1] - piece.rows[0], *shape[1:])
            full[piece.rows[0] : piece.rows[1]] = chunk.reshape(rows)
        return full

    def stored(self, name: str) -> StoredTensor | None:
        """Where the parameter's bytes lie in the data files, when they lie there in order (its
        chunks whole, one after another, or one run of one chunk), for copying them file to file
        unread; None otherwise (it is then read with `get`)."""
        region = self._whole_region(name)
        if region is None:
            return None
        offset, shape = tuple(s.start for s in region), tuple(s.stop - s.start for s in region)
        spans = self._records.spans(self._pieces[name][0].key, offset, shape)
        if spans is None:
            return None
        return StoredTensor(self.dtype(name), self.shape(name), tuple(spans))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of the parameter; of a parameter stored whole in its key, only
        those rows are read."""
        piece, *more = self._pieces[name]
        if more or piece.rows is not None or piece.chunk_shape != piece.param_shape:
            return self.get(name)[start:stop]
        offset = (piece.offset[0] + start, *piece.offset[1:])
        return self._region(piece.key, offset, (stop - start, *piece.chunk_shape[1:]))

    def _region(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        direct = self._records.region(key, offset, shape)
        if direct is not None:
            return direct
        whole = self._load_with_dcp(key)  # a record this reader does not read
        return whole[tuple(slice(o, o + n) for o, n in zip(offset, shape))]

    def _load_with_dcp(self, key: str) -> torch.Tensor:
        """The whole key, by PyTorch DCP's own reader (kept while the next key is read)."""
        if key in self._keys:
            return self._keys[key]
        from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, load
        from torch.distributed.checkpoint.api import CheckpointException

        state = {key: torch.empty(self._global[key], dtype=self._dtypes[key])}
        try:
            load(
                state,
                storage_reader=FileSystemReader(str(self.directory)),
                planner=DefaultLoadPlanner(flatten_state_dict=False),
                no_dist=True,
            )
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a bad data file
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            cause = lines[-1] if lines else type(e).__name__  # DCP's last line names it
            raise ConversionError(
                f"{key}: cannot read it from the torch_dist checkpoint at {self.directory} ({cause})"
            ) from None
        self._keys.clear()
        self._keys[key] = state[key]
        return state[key]
