"""Whole-checkpoint conversion on disk through a bridge's groups, one group at a time.

Every source tensor is used exactly once: before anything is written, the source's key set is
compared with the bridge's (missing and unexpected tensors are named), and every shape and dtype is
checked against the table. The destination appears only once complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codegen.errors import ConversionError
from codegen.runtime.bridge import BridgeBase
from codegen.runtime.checkpoint import DEFAULT_MAX_SHARD_BYTES, CheckpointReader, ShardWriter, staged_directory
from codegen.runtime.mappings import ConvertOptions, Group, Shape

RECORD = "codegen.json"
HF_CONFIG = "hf_config.json"
HF_EXTRA_FILES = ("generation_config.json",)
MEGATRON_SAFETENSORS = "megatron-safetensors"

Progress = Callable[[int], None]


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


def _load_group(reader: CheckpointReader, names: Iterable[str]) -> dict[str, torch.Tensor]:
    tensors = {name: reader.get(name) for name in names}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        detail = ", ".join(f"{n} {t.dtype}" for n, t in tensors.items())
        raise ConversionError(f"tensors converted together have different dtypes: {detail}")
    return tensors


def _convert_groups(
    groups: Iterable[Group],
    reader: CheckpointReader,
    writer: ShardWriter,
    to_target: Callable[[Group, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    source_side: str,
    target_side: str,
    progress: Progress | None,
) -> Report:
    read = written = 0
    for group in groups:
        tensors = _load_group(reader, getattr(group, source_side))
        out = to_target(group, tensors)
        expected = getattr(group, target_side)
        if set(out) != set(expected):
            raise ConversionError(f"internal: {group.kind} produced {sorted(out)} instead of {sorted(expected)}")
        for name, tensor in out.items():
            if tuple(tensor.shape) != tuple(expected[name]):
                raise ConversionError(f"{name}: converted to shape {list(tensor.shape)}, expected {list(expected[name])}")
            writer.add(name, tensor)
        read += len(tensors)
        written += len(out)
        if progress:
            progress(sum(t.numel() * t.element_size() for t in out.values()))
    return Report(read, written, writer.total_size)


def hf_to_megatron(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    record: Mapping[str, Any],
    options: ConvertOptions = ConvertOptions(),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """HF safetensors -> the unsharded Megatron state dict as safetensors (megatron-core names)."""
    with CheckpointReader(source) as reader:
        check_source(reader, bridge.hf_shapes, "HF")
        with staged_directory(destination, force=force) as staging:
            writer = ShardWriter(staging, max_shard_bytes=max_shard_bytes, metadata={"format": MEGATRON_SAFETENSORS})
            report = _convert_groups(bridge.groups, reader, writer, lambda g, ts: g.to_megatron(ts, options), "hf", "megatron", progress)
            writer.close()
            _copy_hf_files(Path(source), staging)
            (staging / RECORD).write_text(json.dumps(dict(record), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report


def megatron_to_hf(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress | None = None,
) -> Report:
    """The Megatron safetensors written by `hf_to_megatron` -> HF shards, index and config."""
    with CheckpointReader(source) as reader:
        check_source(reader, bridge.megatron_shapes, "Megatron")
        with staged_directory(destination, force=force) as staging:
            writer = ShardWriter(staging, max_shard_bytes=max_shard_bytes)
            report = _convert_groups(bridge.groups, reader, writer, lambda g, ts: g.to_hf(ts), "megatron", "hf", progress)
            writer.close()
            shutil.copyfile(Path(source) / HF_CONFIG, staging / "config.json")
            for name in HF_EXTRA_FILES:
                if (Path(source) / f"hf_{name}").is_file():
                    shutil.copyfile(Path(source) / f"hf_{name}", staging / name)
    return report


def read_record(source: Path) -> dict[str, Any]:
    path = Path(source) / RECORD
    if not path.is_file():
        raise ConversionError(f"{source}: no {RECORD}; not a Megatron checkpoint written by codegen convert")
    return json.loads(path.read_text(encoding="utf-8"))


def _copy_hf_files(source: Path, staging: Path) -> None:
    shutil.copyfile(source / "config.json", staging / HF_CONFIG)
    for name in HF_EXTRA_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / f"hf_{name}")
