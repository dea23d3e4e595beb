"""Whole-checkpoint conversion on disk through a bridge's groups, one group at a time.

Every source tensor is used exactly once: before anything is written, the source's key set is
compared with the bridge's (missing and unexpected tensors are named), and every shape and dtype is
checked against the table. Output shards are planned from that check and streamed, so memory holds
one group of tensors at a time. The destination appears only once complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codegen.errors import ConversionError
from codegen.runtime.bridge import BridgeBase
from codegen.runtime.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, staged_directory
from codegen.runtime.mappings import ConvertOptions, Group, Shape
from codegen.runtime.safetensors_stream import Opener, Planned, StreamingWriter, plan_shards, write_index

RECORD = "codegen.json"
HF_CONFIG = "hf_config.json"
HF_EXTRA_FILES = ("generation_config.json",)
MEGATRON_SAFETENSORS = "megatron-safetensors"


class Progress:
    """What a conversion reports as it goes; the default reports nothing."""

    def start(self, tensors: int, total_bytes: int) -> None: ...

    def advance(self, tensors: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class Report:
    tensors_read: int
    tensors_written: int
    bytes_written: int


def check_source(reader: CheckpointReader, expected: Mapping[str, Shape], what: str) -> None:
    """The source holds exactly the expected tensors, each of the expected shape."""
    names = reader.names()
    missing = sorted(set(expected) - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{missing[0]}: missing from the {what} checkpoint at {reader.directory}{more}")
    unexpected = sorted(names - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{unexpected[0]}: unexpected tensor in the {what} checkpoint at {reader.directory}, not in the bridge{more}")
    for name, shape in expected.items():
        found = reader.tensors[name].shape
        if found != tuple(shape):
            raise ConversionError(f"{name}: shape {list(found)} in {reader.tensors[name].file}, but the bridge expects {list(shape)}")


def group_dtype(reader: CheckpointReader, names: Sequence[str]) -> torch.dtype:
    """The one dtype of tensors converted together (a mix would be silently promoted)."""
    dtypes = {reader.dtype(n) for n in names}
    if len(dtypes) > 1:
        detail = ", ".join(f"{n} {reader.dtype(n)}" for n in names)
        raise ConversionError(f"tensors converted together have different dtypes: {detail}")
    return dtypes.pop()


def plan(groups: Sequence[Group], reader: CheckpointReader, source_side: str, target_side: str) -> list[Planned]:
    """Every output tensor, in write order, with its dtype (the group's) and shape (the table's)."""
    planned = []
    for group in groups:
        dtype = group_dtype(reader, list(getattr(group, source_side)))
        planned += [Planned(name, dtype, tuple(shape)) for name, shape in getattr(group, target_side).items()]
    return planned


def convert_directory(
    groups: Sequence[Group],
    reader: CheckpointReader,
    destination: Path,
    to_target: Callable[[Group, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    source_side: str,
    target_side: str,
    max_shard_bytes: int,
    index_metadata: dict[str, str],
    progress: Progress,
    opener: Opener | None = None,
) -> Report:
    """Stream every group from `reader` through `to_target` into safetensors shards + index."""
    planned = plan(groups, reader, source_side, target_side)
    writer = StreamingWriter(destination, plan_shards(planned, max_shard_bytes), metadata=index_metadata, opener=opener)
    progress.start(len(planned), sum(p.nbytes for p in planned))
    read = 0
    try:
        for group in groups:
            tensors = {name: reader.get(name) for name in getattr(group, source_side)}
            out = to_target(group, tensors)
            for name in getattr(group, target_side):
                writer.write(name, out[name])
            read += len(tensors)
            progress.advance(len(out), sum(t.numel() * t.element_size() for t in out.values()))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.finish()
    write_index(destination, writer.weight_map, writer.bytes_written, index_metadata)
    return Report(read, len(planned), writer.bytes_written)


def hf_to_megatron(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    record: Mapping[str, Any],
    options: ConvertOptions = ConvertOptions(),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress = Progress(),
    opener: Opener | None = None,
) -> Report:
    """HF safetensors -> the unsharded Megatron state dict as safetensors (megatron-core names)."""
    with CheckpointReader(source) as reader:
        check_source(reader, bridge.hf_shapes, "HF")
        with staged_directory(destination, force=force) as staging:
            report = convert_directory(
                bridge.groups, reader, staging, lambda g, ts: g.to_megatron(ts, options),
                source_side="hf", target_side="megatron", max_shard_bytes=max_shard_bytes,
                index_metadata={"format": MEGATRON_SAFETENSORS}, progress=progress, opener=opener,
            )
            copy_hf_files(Path(source), staging)
            (staging / RECORD).write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report


def megatron_to_hf(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress = Progress(),
    opener: Opener | None = None,
) -> Report:
    """The Megatron safetensors written by `hf_to_megatron` -> HF shards, index and config."""
    with CheckpointReader(source) as reader:
        check_source(reader, bridge.megatron_shapes, "Megatron")
        with staged_directory(destination, force=force) as staging:
            report = convert_directory(
                bridge.groups, reader, staging, lambda g, ts: g.to_hf(ts),
                source_side="megatron", target_side="hf", max_shard_bytes=max_shard_bytes,
                index_metadata={}, progress=progress, opener=opener,
            )
            restore_hf_files(Path(source), staging)
    return report


def read_record(source: Path) -> dict[str, Any]:
    path = Path(source) / RECORD
    if not path.is_file():
        raise ConversionError(f"{source}: no {RECORD}; not a Megatron checkpoint written by codegen convert")
    return json.loads(path.read_text(encoding="utf-8"))


def copy_hf_files(source: Path, staging: Path) -> None:
    """Keep the HF config (and generation config) with the Megatron checkpoint, for the way back."""
    shutil.copyfile(source / "config.json", staging / HF_CONFIG)
    for name in HF_EXTRA_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / f"hf_{name}")


def restore_hf_files(source: Path, staging: Path) -> None:
    shutil.copyfile(source / HF_CONFIG, staging / "config.json")
    for name in HF_EXTRA_FILES:
        if (source / f"hf_{name}").is_file():
            shutil.copyfile(source / f"hf_{name}", staging / name)
