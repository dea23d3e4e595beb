"""A Megatron checkpoint written by this project, moved from one target model class's names to
another's (GPTModel <-> HybridModel) without HF in between: a renaming, bit for bit.

The two bridges of one spec are rendered from the same spec by the same templates, so their tables
hold the same groups, made of the same HF tensors by the same transforms in the same order; only
the Megatron names differ (`decoder.layers.{i}.mlp.*` is `decoder.layers.{2i+1}.mlp.*`, ...). The
name map pairs the groups by their HF tensors and the Megatron tensors of paired groups by position,
and holds kind, shape and tensor-parallel split equal; it is a bijection or an error naming the
tensor. Every source tensor is read once and written once under its new name, unchanged, streamed
group by group as `offline` does, into either Megatron format (torch_dist in the same run tree
`hf-to-megatron` writes).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.protocol import StoringReader, TensorReader
from qwen35_bridge.formats.megatron_bridge import TOKENIZER_FOLDER
from qwen35_bridge.formats.record import (
    FORMAT_TORCH_DIST,
    FORMATS,
    HF_CONFIG_NAME,
    KEPT_HF_FILES,
    Record,
    copy_tokenizer_files,
)
from qwen35_bridge.formats.safetensors.writer import DEFAULT_MAX_SHARD_BYTES
from qwen35_bridge.formats.spans import StoredTensor
from qwen35_bridge.formats.staging import staged_directory
from qwen35_bridge.mapping.kinds import ConvertOptions
from qwen35_bridge.offline import (
    DEFAULT_MEMORY_BUDGET,
    RUN_MEGATRON_LM,
    Progress,
    Report,
    write_run,
    check_source,
    convert_directory,
    megatron_reader,
    record_root,
)

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase


def name_map(source: BridgeBase, target: BridgeBase) -> dict[str, str]:
    """Each Megatron name of `source`'s table -> the name of the same tensor in `target`'s."""
    if source.spec_sha256 != target.spec_sha256:
        raise ConversionError(
            f"{source.model_id}: the {source.target} and {target.target} bridges were rendered "
            "from different specs; their tensors do not correspond"
        )
    theirs = {tuple(group.hf): group for group in target.groups}
    names: dict[str, str] = {}
    for group in source.groups:
        other = theirs.pop(tuple(group.hf), None)
        first = next(iter(group.megatron))
        if other is None or other.kind != group.kind or len(other.megatron) != len(group.megatron):
            raise ConversionError(
                f"{first}: no tensor of the {target.target} bridge is made like it (from "
                f"{', '.join(group.hf)})"
            )
        for (name, shape), (new, new_shape) in zip(group.megatron.items(), other.megatron.items()):
            if tuple(shape) != tuple(new_shape) or group.split != other.split:
                raise ConversionError(
                    f"{name}: {list(shape)} split {group.split} in the {source.target} bridge but "
                    f"{new} is {list(new_shape)} split {other.split} in the {target.target} bridge"
                )
            names[name] = new
    if theirs:
        left = next(iter(next(iter(theirs.values())).megatron))
        raise ConversionError(f"{left}: no tensor of the {source.target} bridge becomes it")
    return names


class RenamedReader:
    """A source checkpoint's tensors under the target bridge's names (reads nothing itself)."""

    def __init__(self, reader: TensorReader, names: dict[str, str]) -> None:
        self._reader = reader
        self._source = {new: old for old, new in names.items()}
        self.directory = reader.directory

    def names(self) -> set[str]:
        return set(self._source)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(self._source[name])

    def dtype(self, name: str) -> torch.dtype:
        return self._reader.dtype(self._source[name])

    def file(self, name: str) -> str:
        return self._reader.file(self._source[name])

    def get(self, name: str) -> torch.Tensor:
        return self._reader.get(self._source[name])

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = self._reader.get_many([self._source[n] for n in names])
        return {n: tensors[self._source[n]] for n in names}

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._reader.get_rows(self._source[name], start, stop)

    def stored(self, name: str) -> StoredTensor | None:
        if not isinstance(self._reader, StoringReader):
            return None
        return self._reader.stored(self._source[name])

    def close(self) -> None:
        self._reader.close()


def retarget(
    source: BridgeBase,
    target: BridgeBase,
    src: Path,
    destination: Path,
    *,
    record: Record,
    output_format: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress = Progress(),
    budget: int | None = DEFAULT_MEMORY_BUDGET,
) -> Report:
    """The Megatron checkpoint `src` (written for `source`'s target, as its `record` says; its
    folder or, for a run tree, its run root or iteration folder) written to `destination` under
    `target`'s names, in `output_format` (`safetensors` or `torch_dist`), with its record, HF config
    and tokenizer files. Nothing is written unless every source tensor is there, with the shape
    the table says."""
    root = record_root(Path(src))
    if root is None:
        raise ConversionError(f"{src}: not a Megatron checkpoint written by codegen convert")
    if record.target != source.target:
        raise ConversionError(
            f"{src}: holds {record.target} tensors, not {source.target} ones (its record says so)"
        )
    names = name_map(source, target)
    out_record = replace(
        record,
        target=target.target,
        bridge_module=type(target).__module__,
        format=FORMATS[output_format],
    )
    with megatron_reader(source, Path(src)) as reader:
        check_source(reader, source.megatron_shapes, "Megatron")
        renamed = RenamedReader(reader, names)
        tokenizer = Path(reader.directory) / TOKENIZER_FOLDER
        tokenizer_source = tokenizer if tokenizer.is_dir() else None
        with staged_directory(destination, force=force, source=root) as staging:
            if out_record.format == FORMAT_TORCH_DIST:
                report = write_run(
                    target,
                    renamed,
                    staging,
                    ConvertOptions(),
                    progress,
                    tokenizer_source,
                    RUN_MEGATRON_LM,
                    megatron_source=True,
                    budget=budget,
                )
            else:
                report = convert_directory(
                    target.groups,
                    renamed,
                    staging,
                    lambda _group, tensors: tensors,
                    source_side="megatron",
                    target_side="megatron",
                    max_shard_bytes=max_shard_bytes,
                    index_metadata={"format": out_record.format},
                    progress=progress,
                    budget=budget,
                )
                copy_tokenizer_files(tokenizer_source, staging / TOKENIZER_FOLDER)
            for name in (HF_CONFIG_NAME, *(f"hf_{n}" for n in KEPT_HF_FILES)):
                if (root / name).is_file():
                    shutil.copyfile(root / name, staging / name)
            out_record.write(staging)
    return report
