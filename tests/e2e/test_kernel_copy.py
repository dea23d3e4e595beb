"""Tensors a conversion passes on unchanged are copied file to file (formats/spans.py): the byte
plans of the mapping kinds give what their conversion functions give, and a conversion that
copies them into direct files' buffers, in the kernel (`--page-cache`), or through memory where
the kernel cannot, writes exactly the files one that reads every tensor writes."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from qwen35_bridge import offline
from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import direct, spans
from qwen35_bridge.formats.spans import Span, StoredTensor
from qwen35_bridge.formats.torch_dist.reader import _run_start
from qwen35_bridge.mapping.kinds import ConvertOptions
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import make_checkpoint
from tests.support.checkpoints import read_checkpoint

VARIANTS = {
    "dense": ("Qwen/Qwen3.6-27B", {"text_only": True, "text_prefix": "model"}),
    "moe-packed": ("Qwen/Qwen3.5-35B-A3B", {"text_only": True, "experts_layout": "packed"}),
    "qwen3-next": ("Qwen/Qwen3-Next-80B-A3B-Instruct", {"experts_layout": "per_expert"}),
    "vl": ("Qwen/Qwen3.5-0.8B", {}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory) -> tuple[Path, Path]:
    """An HF checkpoint of the variant and its bridge folder."""
    tmp = tmp_path_factory.mktemp(request.param)
    model_id, options = VARIANTS[request.param]
    checkpoint = make_checkpoint(tmp / "hf", catalog.entry(model_id).config, seed=5, **options)
    return checkpoint.path, tmp / "bridges"


def _distinct(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values no two tensors share, so that a byte moved to the wrong place shows."""
    count = torch.Size(shape).numel()
    return (torch.arange(count, dtype=torch.float64) + seed * 1e7).reshape(shape)


def _assembled(pieces, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [
            (tensors[name] if rows is None else tensors[name][rows[0] : rows[1]]).reshape(-1)
            for name, rows in pieces
        ]
    )


def test_byte_plans_give_what_the_conversion_functions_give(variant) -> None:
    source, bridges = variant
    bridge, _spec, _ = bridge_for_checkpoint(source, bridge_dir=bridges, quiet=True)
    planned = [g for g in bridge.groups if g.copies is not None]
    kinds = {g.kind for g in planned}
    assert kinds == {g.kind for g in bridge.groups} - {"GDNOutNorm"}  # all but a shift
    for number, group in enumerate(planned):
        hf = {
            n: _distinct(shape, number * 100 + i) for i, (n, shape) in enumerate(group.hf.items())
        }
        megatron = group.to_megatron(hf, ConvertOptions())
        assert list(group.copies.to_megatron) == list(group.megatron)
        for name, pieces in group.copies.to_megatron.items():
            assert torch.equal(_assembled(pieces, hf), megatron[name].reshape(-1)), name
        back = group.to_hf(megatron, ConvertOptions())
        assert list(group.copies.to_hf) == list(group.hf)
        for name, pieces in group.copies.to_hf.items():
            assert torch.equal(_assembled(pieces, megatron), back[name].reshape(-1)), name


def _folder_bytes(folder: Path) -> dict[str, object]:
    """Every file's bytes; of a torch_dist `.metadata`, what it says but its random save id."""
    out: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == ".metadata":
            metadata = FileSystemReader(str(path.parent)).read_metadata()
            out[str(path.relative_to(folder))] = (
                metadata.state_dict_metadata,
                metadata.storage_data,
            )
        else:
            out[str(path.relative_to(folder))] = path.read_bytes()
    return out


def _round_trip(
    source: Path, bridges: Path, work: Path, fmt: str, *options: str
) -> dict[str, object]:
    """hf-to-megatron in `fmt` and back, into the same folders every time (the torch_dist
    metadata names its folder); the bytes of both outputs."""
    megatron, back = work / "megatron", work / "back"
    common = [
        *("--bridge-dir", str(bridges), "--quiet", "--max-shard-size", "200KB", "--force"),
        *options,
    ]
    assert (
        main(["convert", "hf-to-megatron", str(source), str(megatron), "--format", fmt, *common])
        == 0
    )
    assert main(["convert", "megatron-to-hf", str(megatron), str(back), *common]) == 0
    out = {f"megatron/{k}": v for k, v in _folder_bytes(megatron).items()}
    return out | {f"back/{k}": v for k, v in _folder_bytes(back).items()}


class _Copies:
    """Counts the bytes copied from source files: by os.copy_file_range into a file written
    through the page cache, and read into a direct file's buffer."""

    def __init__(self, patch) -> None:
        self.in_kernel = self.into_buffers = 0
        copy_file_range, read_exactly = os.copy_file_range, direct.read_exactly

        def copying(*args, **kwargs) -> int:
            count = copy_file_range(*args, **kwargs)
            self.in_kernel += count
            return count

        def reading(span, skip, view) -> None:
            read_exactly(span, skip, view)
            self.into_buffers += len(view)

        patch.setattr(os, "copy_file_range", copying)
        patch.setattr(direct, "read_exactly", reading)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_dist"])
def test_copying_file_to_file_writes_what_reading_every_tensor_writes(
    variant, tmp_path: Path, monkeypatch, fmt: str
) -> None:
    source, bridges = variant
    with monkeypatch.context() as patch:
        copies = _Copies(patch)
        copied = _round_trip(source, bridges, tmp_path, fmt)
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert copies.into_buffers > source_bytes and copies.in_kernel == 0  # most of it, both ways
    with monkeypatch.context() as patch:
        patch.setattr(offline, "stored_outputs", lambda *_args: None)
        read = _round_trip(source, bridges, tmp_path, fmt)
    assert copied.keys() == read.keys()
    assert [k for k in copied if copied[k] != read[k]] == []
    back, original = read_checkpoint(tmp_path / "back"), read_checkpoint(source)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_dist"])
def test_files_written_through_the_page_cache_are_the_same(variant, tmp_path, monkeypatch, fmt):
    """With `--page-cache`, rows are copied by the kernel into page-cache files: the same files."""
    expected = _round_trip(*variant, tmp_path, fmt)
    with monkeypatch.context() as patch:
        copies = _Copies(patch)
        assert _round_trip(*variant, tmp_path, fmt, "--page-cache") == expected
    source_bytes = sum(p.stat().st_size for p in variant[0].glob("*.safetensors"))
    assert copies.in_kernel > source_bytes and copies.into_buffers == 0
    assert direct.enabled  # as it was before the command


def test_where_the_kernel_cannot_copy_the_bytes_go_through_memory(
    variant, tmp_path: Path, monkeypatch
) -> None:
    source, bridges = variant
    page_cache = "--page-cache"  # what copy_file_range copies into
    expected = _round_trip(source, bridges, tmp_path, "torch_dist", page_cache)

    def cannot(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cannot)
    monkeypatch.setattr(spans, "_kernel_copies", True)
    assert _round_trip(source, bridges, tmp_path, "torch_dist", page_cache) == expected
    assert spans._kernel_copies is False


def _file(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def _appended(stored: StoredTensor) -> bytes:
    """The stored tensor's bytes, appended to a file in memory (read, not copied in the kernel)."""
    out = io.BytesIO()
    spans.append(stored.spans, out)
    return out.getvalue()


def test_stored_tensors_cut_join_and_append(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    fd = _file(tmp_path, data)
    try:
        a = StoredTensor(torch.uint8, (4, 8), (Span(fd, 100, 32, "source.bin"),))
        b = StoredTensor(torch.uint8, (2, 8), (Span(fd, 132, 16, "source.bin"),))
        joined = spans.join([a.rows(1, 3), a.rows(3, 4), b], (5, 8))
        assert joined.spans == (Span(fd, 108, 40, "source.bin"),)  # all one run of the file
        assert _appended(joined) == data[108:148]
        other = spans.join([b, a.rows(0, 1)], (3, 8))
        assert len(other.spans) == 2
        assert _appended(other) == data[132:148] + data[100:108]
        on_disk, in_memory = tmp_path / "out.bin", io.BytesIO()
        with on_disk.open("wb") as f:
            f.write(b"head")
            spans.append(other.spans, f)
            f.write(b"tail")
        spans.append(other.spans, in_memory)
        assert on_disk.read_bytes() == b"head" + data[132:148] + data[100:108] + b"tail"
        assert in_memory.getvalue() == data[132:148] + data[100:108]
    finally:
        os.close(fd)


def test_a_span_past_the_end_of_its_file_is_an_error_naming_it(tmp_path: Path) -> None:
    fd = _file(tmp_path, b"x" * 100)
    try:
        short = StoredTensor(torch.uint8, (64,), (Span(fd, 60, 64, "source.bin"),))
        with pytest.raises(ConversionError, match=r"source\.bin: truncated"):
            with (tmp_path / "out.bin").open("wb") as f:
                spans.append(short.spans, f)
        with pytest.raises(ConversionError, match=r"source\.bin: truncated"):
            _appended(short)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("low", "high", "origin", "sizes", "start"),
    [
        ((0, 0), (4, 6), (0, 0), (4, 6), 0),  # a whole chunk
        ((1, 0), (3, 6), (0, 0), (4, 6), 6),  # rows 1 and 2
        ((5, 0), (6, 6), (4, 0), (4, 6), 6),  # row 5 of a chunk placed at row 4
        ((2, 1), (3, 4), (0, 0), (4, 6), 13),  # part of one row
        ((0, 2), (4, 4), (0, 0), (4, 6), None),  # columns: a run per row
        ((2, 0, 0), (3, 4, 3), (0, 0, 0), (5, 4, 3), 24),  # expert 2 of a stack
        ((1, 0, 0), (3, 2, 3), (0, 0, 0), (5, 4, 3), None),  # half of two experts
    ],
)
def test_where_a_box_is_one_run_of_a_chunk(low, high, origin, sizes, start) -> None:
    assert _run_start(low, high, origin, sizes) == start
