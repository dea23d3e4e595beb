"""Output files written with O_DIRECT: bytes go from two reused, aligned buffers to the disk,
never through the page cache.

A conversion writes as many bytes as it reads, once, and nothing reads them back in the same
process. Written through the page cache, every output byte first takes a fresh page of memory,
and the dirty pages are then written back while the conversion goes on; past the dirty limit the
writer is throttled to the disk's speed anyway. On these machines (a VM whose freed memory goes
back to the host) a fresh page costs more than the disk: 4 GB took 4.5-7.3 s written through
the page cache and 2.4-3.6 s with O_DIRECT from one buffer, and two writers with O_DIRECT wrote
twice as fast as one where two through the page cache did not. On a many-terabyte conversion it
also leaves the page cache to the sources being read. Where a filesystem refuses O_DIRECT
(tmpfs, some network filesystems), the file is written through the page cache as before.

A full buffer is written by a thread of the file's own while the other buffer is filled, so
reading the sources (or copying bytes in) and writing to the disk overlap in one process, as
they do across the processes of a conversion with several workers.

A file that closes leaves its buffers to the next one (a safetensors output is written shard
after shard). Their pages are then already mapped, and on these machines mapping fresh pages
costs more than the copy into them: the two buffers of a file took 75-85 ms to fault in, and
10 ms to fill once mapped.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from qwen35_bridge.formats.spans import Span, read_exactly

#: File offsets, lengths and memory O_DIRECT transfers are aligned to: the largest logical
#: block size of common devices (most need 512).
ALIGN = 4096
BUFFER_BYTES = 64 << 20  # each of the buffers a file is written through
BUFFERS_PER_FILE = 2  # one filled while the file's thread writes the other

#: Whether output files are written with O_DIRECT where the filesystem allows it.
enabled = True

_spare: list[mmap.mmap] = []  # buffers of closed files, for the next file (at most a file's two)
_spare_lock = threading.Lock()


def _take_buffer() -> mmap.mmap:
    """A buffer left by a closed file, or a new one. Private memory: a forked child writing into
    one never changes its parent's."""
    with _spare_lock:
        while _spare:
            buffer = _spare.pop()
            if len(buffer) == BUFFER_BYTES:
                return buffer
            buffer.close()  # of another size (BUFFER_BYTES was changed)
    return mmap.mmap(-1, BUFFER_BYTES, flags=mmap.MAP_PRIVATE)


def _leave_buffer(buffer: mmap.mmap) -> None:
    """A closed file's buffer kept for the next file, or unmapped when a file's worth is kept."""
    with _spare_lock:
        if len(_spare) < BUFFERS_PER_FILE:
            _spare.append(buffer)
            return
    buffer.close()


def _forget_spare_buffers() -> None:
    """In a forked child: the parent's spare buffers are not the child's to reuse (its pages would
    be copied on the first write anyway), nor is a lock another thread of the parent held."""
    global _spare_lock
    _spare.clear()
    _spare_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_spare_buffers)


def open_output(path: Path | str) -> BinaryIO:
    """`path` created (or emptied) for writing front to back: with O_DIRECT where it is enabled
    and the filesystem takes it, else an ordinary buffered file."""
    if enabled and hasattr(os, "O_DIRECT"):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT
        try:
            return DirectFile(os.open(path, flags, 0o666), str(path))  # type: ignore[return-value]
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return open(path, "wb")  # noqa: SIM115 - the caller closes it


class DirectFile:
    """A file written front to back through two aligned buffers, whole blocks at a time with
    O_DIRECT: one is filled while the other is written by the file's thread. The last block is
    padded and the file cut to its length on `close`. Offers what the writers use of a binary
    file (`write`, `tell`, `flush`, `close`), and `append_spans`, which reads stored tensors'
    bytes straight into the buffer. An error writing is raised by the next call that hands a
    buffer over, or by `close`."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd, self.name = fd, path
        # page-aligned, so aligned for O_DIRECT
        self._buffers = [_take_buffer() for _ in range(BUFFERS_PER_FILE)]
        self._views = [memoryview(buffer) for buffer in self._buffers]
        self._current = 0  # which buffer is being filled
        self._filled = 0  # bytes waiting in it
        self._written = 0  # bytes handed to the thread: a multiple of ALIGN until close
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"write {os.path.basename(path)}")
        self._in_flight: Future[None] | None = None
        self.closed = False

    @property
    def _view(self) -> memoryview:
        return self._views[self._current]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")

        def copy(into: memoryview, at: int) -> None:
            into[:] = view[at : at + len(into)]

        self._fill(len(view), copy)
        return len(view)

    def append_spans(self, spans: Sequence[Span]) -> None:
        """The spans' bytes, read from their files into the buffer (one copy, no other memory)."""
        for span in spans:
            self._fill(span.nbytes, lambda into, at, span=span: read_exactly(span, at, into))

    def _fill(self, nbytes: int, fill: Callable[[memoryview, int], None]) -> None:
        """`nbytes` more bytes in the buffer, `fill(into, at)` putting bytes `[at, at +
        len(into))` of them into each free stretch of it; every full buffer is handed over."""
        done = 0
        while done < nbytes:
            count = min(nbytes - done, BUFFER_BYTES - self._filled)
            fill(self._view[self._filled : self._filled + count], done)
            self._filled += count
            done += count
            if self._filled == BUFFER_BYTES:
                self._hand_over()

    def tell(self) -> int:
        return self._written + self._filled

    def flush(self) -> None:
        """Nothing: only whole blocks can be written, and the last goes on `close`."""

    def close(self) -> None:
        """The bytes still in the buffer written (their last block padded, then cut off)."""
        if self.closed:
            return
        try:
            length = self.tell()
            padded = -self._filled % ALIGN
            self._view[self._filled : self._filled + padded] = bytes(padded)
            self._filled += padded
            self._hand_over()
            self._finish_in_flight()
            os.ftruncate(self._fd, length)
        except BaseException:
            self._release(reuse=False)
            raise
        self._release(reuse=True)

    def abort(self) -> None:
        """Closed without writing what is still buffered (its folder is being removed)."""
        if not self.closed:
            self._release(reuse=False)

    def _release(self, *, reuse: bool) -> None:
        """The file closed once nothing writes to it; its buffers left to the next file where it
        closed cleanly (else a slice of one may still be held, by an error being raised)."""
        self.closed = True
        self._writer.shutdown(wait=True)
        os.close(self._fd)
        for view, buffer in zip(self._views, self._buffers, strict=True):
            view.release()
            if reuse:
                _leave_buffer(buffer)
                continue
            try:
                buffer.close()
            except BufferError:  # a slice is still held: freed with it
                pass

    def _hand_over(self) -> None:
        """The filled buffer given to the thread to write at the end of the file, once the
        write before it has finished; filling goes on in the other buffer."""
        self._finish_in_flight()
        self._in_flight = self._writer.submit(
            self._write_out, self._current, self._filled, self._written
        )
        self._written += self._filled
        self._filled = 0
        self._current = 1 - self._current

    def _finish_in_flight(self) -> None:
        """The write handed over last finished, its error raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def _write_out(self, buffer: int, nbytes: int, offset: int) -> None:
        """The first `nbytes` of a buffer (a multiple of ALIGN) written at `offset`: run by the
        file's thread."""
        with self._views[buffer][:nbytes] as data:
            done = 0
            while done < nbytes:
                try:
                    count = os.pwrite(self._fd, data[done:], offset + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or not self._drop_direct():
                        raise
                    continue
                if count == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
                done += count

    def _drop_direct(self) -> bool:
        """O_DIRECT turned off for this file (a filesystem that opens with it but refuses the
        writes); False where it was off already."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        return True

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
