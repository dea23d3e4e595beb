"""Output files written with O_DIRECT (formats/direct.py) hold exactly the bytes written, however
the writes and copied spans fall across the buffer and the last block; where the filesystem
refuses O_DIRECT, the file is written through the page cache instead."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from qwen35_bridge.formats import direct, spans
from qwen35_bridge.formats.direct import DirectFile
from qwen35_bridge.formats.spans import Span


@pytest.fixture
def small_buffer(monkeypatch) -> int:
    """A buffer of three blocks, so that writes cross it many times."""
    monkeypatch.setattr(direct, "BUFFER_BYTES", 3 * direct.ALIGN)
    return 3 * direct.ALIGN


def _source(tmp_path: Path, size: int) -> tuple[bytes, int]:
    data = random.Random(1).randbytes(size)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return data, os.open(path, os.O_RDONLY)


def test_writes_and_spans_of_every_size_land_in_order(tmp_path: Path, small_buffer: int) -> None:
    data, fd = _source(tmp_path, 50_000)
    chooser = random.Random(2)
    expected = bytearray()
    path = tmp_path / "out.bin"
    with direct.open_output(path) as out:
        assert isinstance(out, DirectFile)
        for step in range(60):
            start = chooser.randrange(len(data))
            size = chooser.choice([0, 1, 7, direct.ALIGN - 1, direct.ALIGN, small_buffer + 5])
            piece = data[start : start + size]
            if step % 2:
                out.write(memoryview(piece))
            else:
                spans.append([Span(fd, start, len(piece), "source.bin")], out)
            expected += piece
            assert out.tell() == len(expected)
    os.close(fd)
    assert path.read_bytes() == bytes(expected)
    assert len(expected) % direct.ALIGN  # the padded last block was cut off


def test_an_empty_file_stays_empty(tmp_path: Path) -> None:
    with direct.open_output(tmp_path / "empty.bin"):
        pass
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_a_file_given_up_keeps_only_whole_written_buffers(tmp_path: Path, small_buffer) -> None:
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), direct.open_output(path) as out:
        out.write(b"x" * (small_buffer + 10))
        raise RuntimeError("the conversion failed")
    assert path.stat().st_size == small_buffer


def test_a_filesystem_without_o_direct_gets_a_buffered_file(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    with direct.open_output(tmp_path / "out.bin") as out:
        assert not isinstance(out, DirectFile)
        out.write(b"abc")
    assert (tmp_path / "out.bin").read_bytes() == b"abc"


def test_writes_refused_with_o_direct_go_on_without_it(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    real_pwrite, refused = os.pwrite, []

    def refusing(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing)
    with direct.open_output(tmp_path / "out.bin") as out:
        out.write(b"abc" * 5000)
    assert refused == [0]
    assert (tmp_path / "out.bin").read_bytes() == b"abc" * 5000


def test_a_full_disk_is_an_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "pwrite", lambda *_args: 0)
    out = direct.open_output(tmp_path / "out.bin")
    out.write(b"abc")
    with pytest.raises(OSError, match="No space left on device"):
        out.close()
    assert out.closed


def test_disabled_means_buffered(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(direct, "enabled", False)
    with direct.open_output(tmp_path / "out.bin") as out:
        assert not isinstance(out, DirectFile)


def test_a_truncated_source_fails_with_its_own_error(tmp_path: Path) -> None:
    _data, fd = _source(tmp_path, 100)
    path = tmp_path / "out.bin"
    with pytest.raises(Exception, match="truncated") as raised, direct.open_output(path) as out:
        spans.append([Span(fd, 50, 100, "source.bin")], out)
    os.close(fd)
    assert raised.type.__name__ == "ConversionError"  # not an error closing the buffer


def test_a_full_buffer_is_written_while_the_next_is_filled(
    tmp_path: Path, small_buffer: int, monkeypatch
) -> None:
    import threading

    real_pwrite, started, release = os.pwrite, threading.Event(), threading.Event()

    def slow(fd, data, offset):
        started.set()
        assert release.wait(timeout=30), "the write was never let go on"
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow)
    path = tmp_path / "out.bin"
    with direct.open_output(path) as out:
        out.write(b"a" * small_buffer)  # hands the first buffer over and returns at once
        assert started.wait(timeout=30)
        out.write(b"b" * (small_buffer - 1))  # fills the other buffer while the first is written
        assert not release.is_set()
        release.set()
    assert path.read_bytes() == b"a" * small_buffer + b"b" * (small_buffer - 1)


def test_a_failed_write_is_raised_by_the_next_hand_over(
    tmp_path: Path, small_buffer: int, monkeypatch
) -> None:
    monkeypatch.setattr(os, "pwrite", lambda *_args: 0)
    out = direct.open_output(tmp_path / "out.bin")
    out.write(b"a" * small_buffer)  # the first buffer's write fails in the file's thread
    with pytest.raises(OSError, match="No space left on device"):
        out.write(b"b" * small_buffer)  # handing over the second waits for the first
    out.abort()
    assert out.closed


def test_a_closed_file_leaves_its_buffers_to_the_next(tmp_path: Path, small_buffer: int) -> None:
    with direct.open_output(tmp_path / "first.bin") as first:
        first.write(b"a" * (small_buffer + 1))
        buffers = {id(buffer) for buffer in first._buffers}
    with direct.open_output(tmp_path / "second.bin") as second:
        assert {id(buffer) for buffer in second._buffers} == buffers  # no fresh pages
        second.write(b"b" * 10)
    assert (tmp_path / "first.bin").read_bytes() == b"a" * (small_buffer + 1)
    assert (tmp_path / "second.bin").read_bytes() == b"b" * 10  # none of the first's bytes


def test_buffers_of_another_size_are_not_reused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(direct, "BUFFER_BYTES", 3 * direct.ALIGN)
    with direct.open_output(tmp_path / "small.bin") as small:
        small.write(b"a")
    monkeypatch.setattr(direct, "BUFFER_BYTES", 5 * direct.ALIGN)
    with direct.open_output(tmp_path / "larger.bin") as larger:
        assert all(len(buffer) == 5 * direct.ALIGN for buffer in larger._buffers)
        larger.write(b"b" * 4 * direct.ALIGN)
    assert (tmp_path / "larger.bin").read_bytes() == b"b" * 4 * direct.ALIGN


def test_a_file_given_up_leaves_no_buffers(tmp_path: Path, small_buffer: int) -> None:
    direct._spare.clear()
    with pytest.raises(RuntimeError), direct.open_output(tmp_path / "out.bin") as out:
        out.write(b"x")
        raise RuntimeError("the conversion failed")
    assert direct._spare == []


def test_a_forked_child_does_not_take_its_parents_buffers(tmp_path: Path) -> None:
    with direct.open_output(tmp_path / "out.bin") as out:
        out.write(b"x")
    assert direct._spare  # the parent keeps them
    child = os.fork()
    if child == 0:  # exit status 0 only where the child kept none
        os._exit(1 if direct._spare else 0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert direct._spare
