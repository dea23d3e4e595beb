"""Tensors a conversion only moves, kept as the byte ranges of the files they lie in.

Converting a checkpoint moves rows and nothing else, but for the GDN output norm: an expert of a
packed tensor, an embedding, the halves of a GLU's fc1, the heads of a QKV in their new order.
Such a tensor need not be held as a tensor: its bytes lie in source files. An output file written
with O_DIRECT (formats/direct.py, the default) reads them straight into its buffer; into a file
written through the page cache, `os.copy_file_range` copies them inside the kernel (one copy, no
page faults; measured on these machines, 2 GB took 0.5-0.7 s that way, against 1.1-6 s read into
memory and written back). Where the kernel cannot copy between the two files (another
filesystem, an old kernel), the bytes are read and written in pieces.
Which tensors, and how a torch_dist record is written this way: docs/reference.md section 14.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import torch

from qwen35_bridge.errors import ConversionError

#: What copy_file_range fails with where the kernel cannot copy between the two files.
_NOT_SUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY}
_PIECE = 16 * 1024 * 1024  # read and written at a time where the kernel cannot copy


@dataclass(frozen=True)
class Span:
    """`nbytes` bytes at `offset` of the open file `fd` (`path` names it in errors)."""

    fd: int
    offset: int
    nbytes: int
    path: str


@dataclass(frozen=True)
class StoredTensor:
    """A tensor's bytes (row-major, in `dtype`) as they lie in files, one span after another."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    spans: tuple[Span, ...]

    def __post_init__(self) -> None:
        if sum(s.nbytes for s in self.spans) != self.nbytes:
            raise ValueError(f"spans of {sum(s.nbytes for s in self.spans)} bytes for {self}")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> StoredTensor:
        """Rows `[start, stop)` (along the first dimension)."""
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return StoredTensor(
            self.dtype, (stop - start, *self.shape[1:]), _cut(self.spans, start * row, stop * row)
        )

    def reshape(self, *shape: int | tuple[int, ...]) -> StoredTensor:
        dims = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if math.prod(dims) != math.prod(self.shape):  # type: ignore[arg-type]
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(dims)}")
        return StoredTensor(self.dtype, dims, self.spans)  # type: ignore[arg-type]


def join(parts: Sequence[StoredTensor], shape: tuple[int, ...]) -> StoredTensor:
    """The tensor of `shape` whose bytes are those of `parts`, one after another (a
    concatenation along the first dimension, or a stack): spans that follow on in one file
    become one."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise ValueError(f"joining tensors of different dtypes: {sorted(map(str, dtypes))}")
    spans: list[Span] = []
    for span in (s for p in parts for s in p.spans):
        last = spans[-1] if spans else None
        if last is not None and last.fd == span.fd and last.offset + last.nbytes == span.offset:
            spans[-1] = Span(last.fd, last.offset, last.nbytes + span.nbytes, last.path)
        else:
            spans.append(span)
    return StoredTensor(dtypes.pop(), tuple(shape), tuple(spans))


def _cut(spans: Sequence[Span], start: int, stop: int) -> tuple[Span, ...]:
    """Bytes `[start, stop)` of the spans taken one after another."""
    out, at = [], 0
    for span in spans:
        low, high = max(start, at), min(stop, at + span.nbytes)
        if low < high:
            out.append(Span(span.fd, span.offset + low - at, high - low, span.path))
        at += span.nbytes
    return tuple(out)


def append(spans: Sequence[Span], file: BinaryIO) -> None:
    """The spans' bytes at the end of `file`: copied in the kernel where `file` is a file on disk
    and the kernel can copy into it, else read and written in pieces. Errors writing (a full
    disk, a size limit) are raised as OSError; a span past the end of its file is a
    ConversionError."""
    append_spans = getattr(file, "append_spans", None)
    if append_spans is not None:  # a file that takes them itself (formats.direct)
        append_spans(spans)
        return
    fileno = _fileno(file)
    if fileno is None:
        for span in spans:
            _copy_through_memory(span, 0, file)
        return
    file.flush()
    position = file.tell()
    for span in spans:
        done = _copy_in_kernel(span, fileno, position)
        position += done
        if done < span.nbytes:
            file.seek(position)
            _copy_through_memory(span, done, file)
            file.flush()
            position += span.nbytes - done
    file.seek(position)


_kernel_copies = True  # until copy_file_range says it cannot copy between the files


def _copy_in_kernel(span: Span, fileno: int, position: int) -> int:
    """How many of the span's bytes `copy_file_range` copied to `position` (all of them, unless
    it cannot copy between the files or the source ends early)."""
    global _kernel_copies
    done = 0
    while _kernel_copies and done < span.nbytes:
        try:
            count = os.copy_file_range(
                span.fd, fileno, span.nbytes - done, span.offset + done, position + done
            )
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            _kernel_copies = False
            break
        if count == 0:  # the source ends here: reading says so, with its name
            break
        done += count
    return done


def _copy_through_memory(span: Span, done: int, file: BinaryIO) -> None:
    buffer = bytearray(min(_PIECE, span.nbytes - done))
    while done < span.nbytes:
        view = memoryview(buffer)[: min(len(buffer), span.nbytes - done)]
        read_exactly(span, done, view)
        file.write(view)
        done += len(view)


def read_exactly(span: Span, skip: int, view: memoryview) -> None:
    """Bytes `[skip, skip + len(view))` of the span into `view`."""
    got = 0
    while got < len(view):
        count = os.preadv(span.fd, [view[got:]], span.offset + skip + got)
        if count == 0:
            raise ConversionError(
                f"{span.path}: truncated; a tensor's data reaches past its end "
                f"(byte {span.offset + skip + got})"
            )
        got += count


def _fileno(file: BinaryIO) -> int | None:
    try:
        return file.fileno()
    except (AttributeError, OSError, ValueError):  # not a file on disk
        return None
