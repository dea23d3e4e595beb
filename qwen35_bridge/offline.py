"""Whole-checkpoint conversion on disk (HF <-> Megatron) through a bridge's groups, one group at a
time.

Every source tensor is used exactly once: before anything is written, the source's key set is
compared with the bridge's (missing and unexpected tensors are named), and every shape and dtype is
checked against the table. Output shards are planned from that check and streamed, so memory holds
one group of tensors at a time. The destination appears only once complete.
"""

from __future__ import annotations

import collections
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import dtypes, fp8, megatron_bridge, megatron_lm, spans
from qwen35_bridge.formats.buffers import ReadBuffers
from qwen35_bridge.formats.fp8 import DequantizingReader
from qwen35_bridge.formats.protocol import StoringReader, TensorReader
from qwen35_bridge.formats.megatron_bridge import TOKENIZER_FOLDER
from qwen35_bridge.formats.record import (
    FORMAT_TORCH_DIST,
    FORMATS,
    RECORD_NAME,
    Record,
    copy_hf_config,
    copy_tokenizer_files,
    keep_hf_files,
    restore_hf_files,
    write_hf_config,
)
from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.formats.safetensors.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    Opener,
    Planned,
    StreamingWriter,
    plan_shards,
    shard_file_names,
    write_index,
)
from qwen35_bridge.formats.spans import StoredTensor
from qwen35_bridge.mapping.kinds import ConvertOptions, Group, Part, Shape
from qwen35_bridge.mapping.transforms import outputs_from
from qwen35_bridge.planning import part_step
from qwen35_bridge.workers import SINGLE, Workers, shares, staged_directory

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase


#: The run trees `hf_to_megatron` writes a torch_dist checkpoint in.
RUN_MEGATRON_LM = "megatron-lm"
RUN_MEGATRON_BRIDGE = "megatron-bridge"
RUN_LAYOUTS = (RUN_MEGATRON_LM, RUN_MEGATRON_BRIDGE)


class Progress:
    """What a conversion reports as it goes; the default reports nothing."""

    def start(self, tensors: int, total_bytes: int) -> None: ...

    def advance(self, tensors: int, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class OutputStage:
    """A last step on each output tensor (FP8 re-quantisation), planned like the rest."""

    def plan(self, planned: Planned) -> list[Planned]:
        return [planned]

    def apply(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor}


@dataclass(frozen=True)
class Report:
    tensors_read: int
    tensors_written: int
    bytes_written: int
    ignored: tuple[str, ...] = ()  # source keys left out on purpose (a trainer's optimizer state)
    notes: tuple[
        str, ...
    ] = ()  # what the user should know (a trainer's vocabulary padding dropped)
    folder: Path | None = None  # the iteration folder a trainer's checkpoint was read from


def check_source(reader: TensorReader, expected: Mapping[str, Shape], what: str) -> None:
    """The source holds exactly the expected tensors, each of the expected shape."""
    names = reader.names()
    missing = sorted(set(expected) - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(
            f"{missing[0]}: missing from the {what} checkpoint at {reader.directory}{more}"
        )
    unexpected = sorted(names - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(
            f"{unexpected[0]}: unexpected tensor in the {what} checkpoint at {reader.directory}, not in the bridge{more}"
        )
    for name, shape in expected.items():
        found = reader.shape(name)
        if found != tuple(shape):
            raise ConversionError(
                f"{name}: shape {list(found)} in {reader.file(name)}, but the bridge expects {list(shape)}"
            )
        if reader.dtype(name) not in dtypes.weight_dtypes():
            raise ConversionError(
                f"{name}: dtype {reader.dtype(name)} in {reader.file(name)}; a weight is float32, "
                "bfloat16 or float16 (float8 only as the quantised weights of an FP8 release)"
            )


def read_group(reader: TensorReader, names: list[str]) -> dict[str, torch.Tensor]:
    """A group's source tensors, in one read where the format allows."""
    return reader.get_many(names)


def group_dtype(reader: TensorReader, names: Sequence[str]) -> torch.dtype:
    """The one dtype of tensors converted together (a mix would be silently promoted)."""
    dtypes = {reader.dtype(n) for n in names}
    if len(dtypes) > 1:
        detail = ", ".join(f"{n} {reader.dtype(n)}" for n in names)
        dequantized = [n for n in names if n in getattr(reader, "quantized", ())]
        hint = ""
        if dequantized:
            stored = {reader.dtype(n) for n in names if n not in dequantized}
            hint = (
                f"; {dequantized[0]} is dequantised to {reader.dtype(dequantized[0])} but is "
                f"converted together with tensors stored as {', '.join(map(str, stored))}: pass "
                f"--dequantize-to {str(next(iter(stored))).removeprefix('torch.')}"
            )
        raise ConversionError(f"tensors converted together have different dtypes: {detail}{hint}")
    return dtypes.pop()


def plan(
    groups: Sequence[Group], reader: TensorReader, source_side: str, target_side: str
) -> list[Planned]:
    """Every output tensor, in write order, with its dtype (the group's) and shape (the table's)."""
    planned = []
    for group in groups:
        dtype = group_dtype(reader, list(getattr(group, source_side)))
        planned += [
            Planned(name, dtype, tuple(shape))
            for name, shape in getattr(group, target_side).items()
        ]
    return planned


#: Memory a conversion may hold in tensors, read and converted (`--memory-budget`); a group
#: whose tensors need more converts in parts.
DEFAULT_MEMORY_BUDGET = 2 * 1000**3


def group_parts(
    group: Group, reader: TensorReader, side: str, budget: int | None
) -> list[Part] | None:
    """The parts to convert `group` in when its `side` tensors and what they convert into exceed
    `budget` bytes and it can be split (a copied tensor by rows, a packed expert tensor by
    experts); None: whole. Each part reads at most half the budget, or one row (one expert)
    where a row is larger (`planning.part_step`)."""
    nbytes = sum(
        math.prod(shape) * reader.dtype(n).itemsize for n, shape in getattr(group, side).items()
    )
    step = part_step(group, nbytes, budget)
    if step is None:
        return None
    return [group.part(i, min(i + step, group.rows)) for i in range(0, group.rows, step)]


def read_part(reader: TensorReader, part: Part, side: str) -> dict[str, torch.Tensor]:
    """A part's `side` tensors: whole where the part has all of a tensor (read together, so
    that tensors stored one after another, a part's experts, arrive as views of one buffer),
    else its rows."""
    ranges = getattr(part, side)
    whole = [name for name, rows in ranges.items() if rows == (0, reader.shape(name)[0])]
    out = reader.get_many(whole)
    for name, (start, stop) in ranges.items():
        if name not in out:
            out[name] = reader.get_rows(name, start, stop)
    return {name: out[name] for name in ranges}


def stored_outputs(
    group: Group, reader: TensorReader, source_side: str, target_side: str
) -> dict[str, StoredTensor] | None:
    """The group's `target_side` tensors as the bytes of source files, in write order, when
    converting it only moves bytes (`group.copies`, or a renaming between model classes) and the
    reader says where each of its source tensors lies (`stored`); None otherwise."""
    if not isinstance(reader, StoringReader):
        return None
    if source_side == target_side:
        pieces = {name: ((name, None),) for name in getattr(group, source_side)}
    elif group.copies is not None:
        pieces = getattr(group.copies, f"to_{target_side}")
    else:
        return None
    sources = {name: reader.stored(name) for name in getattr(group, source_side)}
    if any(found is None for found in sources.values()):
        return None
    shapes = getattr(group, target_side)
    return {
        target: spans.join(
            [sources[n] if rows is None else sources[n].rows(*rows) for n, rows in made_of],
            tuple(shapes[target]),
        )
        for target, made_of in pieces.items()
    }


def convert_directory(
    groups: Sequence[Group],
    reader: TensorReader,
    destination: Path,
    to_target: Callable[[Group, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    *,
    source_side: str,
    target_side: str,
    max_shard_bytes: int,
    index_metadata: dict[str, str],
    progress: Progress,
    opener: Opener | None = None,
    stage: OutputStage | None = None,
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    """Stream every group from `reader` through `to_target` into safetensors shards + index.

    With several workers, each converts its share of the groups (balanced by bytes) into its
    own shards; every worker plans every share, so the shards are numbered alike everywhere, and
    the first writes the index once all have written their shards."""
    planned = [plan([g], reader, source_side, target_side) for g in groups]
    if stage is not None:
        planned = [[q for p in ps for q in stage.plan(p)] for ps in planned]
    runs = shares([sum(p.nbytes for p in ps) for ps in planned], workers.size)
    shards = [plan_shards([p for i in run for p in planned[i]], max_shard_bytes) for run in runs]
    names = shard_file_names(sum(len(s) for s in shards))
    first = sum(len(s) for s in shards[: workers.rank])
    mine = runs[workers.rank]
    writer = StreamingWriter(
        destination,
        shards[workers.rank],
        names=names[first : first + len(shards[workers.rank])],
        metadata=index_metadata,
        opener=opener,
    )
    progress.start(
        sum(len(planned[i]) for i in mine), sum(p.nbytes for i in mine for p in planned[i])
    )
    read = 0
    with workers.step():
        try:
            for i in mine:
                read += _convert_group(
                    groups[i],
                    reader,
                    writer,
                    to_target,
                    source_side,
                    target_side,
                    stage,
                    progress,
                    budget,
                )
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.finish()
    weight_map, number = {}, 0
    for rank_shards in shards:
        for shard in rank_shards:
            weight_map |= {p.name: names[number] for p in shard}
            number += 1
    total = sum(p.nbytes for ps in planned for p in ps)
    reads = sum(workers.gather(read))
    with workers.step():
        if workers.first:
            write_index(destination, weight_map, total, index_metadata)
    return Report(reads, sum(len(ps) for ps in planned), total)


def _convert_group(
    group: Group,
    reader: TensorReader,
    writer: StreamingWriter,
    to_target: Callable[[Group, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    source_side: str,
    target_side: str,
    stage: OutputStage | None,
    progress: Progress,
    budget: int | None,
) -> int:
    """One group read, converted and written (in parts, when it is larger than `budget`); its
    tensors die when this returns, so memory holds one group, or one part, at a time. Returns
    the number of tensors read."""
    stored = stored_outputs(group, reader, source_side, target_side) if stage is None else None
    if stored is not None:  # copied file to file, unread: no memory to bound
        for name in getattr(group, target_side):
            writer.write(name, stored[name])
        progress.advance(len(stored), sum(t.nbytes for t in stored.values()))
        return len(getattr(group, source_side))
    parts = group_parts(group, reader, source_side, budget) if stage is None else None
    if parts is not None:
        for part in parts:
            tensors = read_part(reader, part, source_side)
            same = source_side == target_side  # a renaming (between model classes)
            out = tensors if same else getattr(part, f"to_{target_side}")(tensors)
            for name, rows in getattr(part, target_side).items():
                writer.write(name, out[name], rows=rows)
            progress.advance(0, sum(t.numel() * t.element_size() for t in out.values()))
            del tensors, out
        progress.advance(len(getattr(group, target_side)), 0)
        return len(getattr(group, source_side))
    tensors = read_group(reader, list(getattr(group, source_side)))
    out = to_target(group, tensors)
    if stage is not None:
        out = {
            k: v
            for name in getattr(group, target_side)
            for k, v in stage.apply(name, out[name]).items()
        }
    for name, tensor in out.items():
        writer.write(name, tensor)
    progress.advance(len(out), sum(t.numel() * t.element_size() for t in out.values()))
    return len(tensors)


class ConvertedTensors:
    """Megatron tensors made on demand from `reader` (HF tensors converted, or Megatron tensors
    read as they are when `megatron_source`), for the torch_dist writer: the group (or the part
    of it) a tensor belongs to is converted when first asked for and kept until another is."""

    def __init__(
        self,
        groups: Sequence[Group],
        reader: TensorReader,
        options: ConvertOptions,
        budget: int | None,
        *,
        megatron_source: bool = False,
    ) -> None:
        self._reader, self._options, self._budget = reader, options, budget
        self._side = "megatron" if megatron_source else "hf"
        self._group_of = {name: g for g in groups for name in g.megatron}
        self._parts: dict[int, list[Part] | None] = {}
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None
        self._stored: tuple[Group, dict[str, StoredTensor] | None] | None = None

    def _parts_of(self, group: Group) -> list[Part] | None:
        if id(group) not in self._parts:
            self._parts[id(group)] = group_parts(group, self._reader, self._side, self._budget)
        return self._parts[id(group)]

    def split(self, name: str) -> list[tuple[int, int]] | None:
        parts = self._parts_of(self._group_of[name])
        ranges = [p.megatron[name] for p in parts or () if name in p.megatron]
        return ranges if len(ranges) > 1 else None

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | StoredTensor:
        group = self._group_of[name]
        if (stored := self._stored_of(group)) is not None:  # copied file to file, unread
            return stored[name] if rows is None else stored[name].rows(*rows)
        parts = self._parts_of(group)
        if parts is None:
            tensors = self._held_or(id(group), lambda: self._convert(group))
            tensor = tensors[name]
            return tensor if rows is None else tensor[rows[0] : rows[1]]
        matching = [
            p
            for p in parts
            if name in p.megatron
            and (rows is None or p.megatron[name][0] <= rows[0] < p.megatron[name][1])
        ]
        if len(matching) > 1:  # asked for whole (a chunk that cannot be cut): its parts joined
            return torch.cat([self.tensor(name, p.megatron[name]) for p in matching])
        (part,) = matching
        tensors = self._held_or(id(part), lambda: self._convert_part(part))
        first = part.megatron[name][0]
        tensor = tensors[name]
        return tensor if rows is None else tensor[rows[0] - first : rows[1] - first]

    def _stored_of(self, group: Group) -> dict[str, StoredTensor] | None:
        if self._stored is None or self._stored[0] is not group:
            self._stored = (group, stored_outputs(group, self._reader, self._side, "megatron"))
        return self._stored[1]

    def _held_or(
        self, key: int, make: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        if self._held is None or self._held[0] != key:
            self._held = None  # let the last group go before the next is made
            self._held = (key, make())
        return self._held[1]

    def _convert(self, group: Group) -> dict[str, torch.Tensor]:
        if self._side == "megatron":
            return self._reader.get_many(list(group.megatron))
        return group.to_megatron({name: self._reader.get(name) for name in group.hf}, self._options)

    def _convert_part(self, part: Part) -> dict[str, torch.Tensor]:
        tensors = read_part(self._reader, part, self._side)
        return tensors if self._side == "megatron" else part.to_megatron(tensors)


def hf_to_megatron(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    record: Record,
    options: ConvertOptions = ConvertOptions(),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress = Progress(),
    opener: Opener | None = None,
    dequantize_to: torch.dtype = torch.bfloat16,
    output_format: str = "safetensors",
    run_layout: str = RUN_MEGATRON_LM,
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    """HF safetensors -> a Megatron checkpoint: the unsharded state dict as safetensors
    (megatron-core names), or a `torch_dist` checkpoint in a trainer's run tree (`run_layout`:
    Megatron-LM's, whose tracker names the `release` folder, or Megatron-Bridge's, whose
    `iter_0000000` also holds its run_config.yaml and train state).

    An FP8 checkpoint is dequantised to `dequantize_to` on the way; the record lists which
    tensors were FP8, so that the way back can quantise them again if asked. `budget` bounds the
    memory of one group (larger ones convert in parts); `workers` share the groups.
    """
    record = replace(record, format=FORMATS[output_format])
    with ExitStack() as stack:
        stack.enter_context(outputs_from(ReadBuffers().empty))  # no page faults per group
        with workers.step():
            raw = stack.enter_context(CheckpointReader(source))
            reader: TensorReader = raw
            if bridge.quantization is not None:
                q = bridge.quantization
                reader = DequantizingReader(
                    raw,
                    block=q["weight_block_size"],
                    modules_to_not_convert=q["modules_to_not_convert"],
                    dtype=dequantize_to,
                )
                record = replace(record, fp8_tensors=tuple(sorted(reader.quantized)))
            check_source(reader, bridge.hf_shapes, "HF")
        with staged_directory(destination, workers, force=force, source=Path(source)) as staging:
            if output_format == "torch_dist":
                report = write_run(
                    bridge,
                    reader,
                    staging,
                    options,
                    progress,
                    Path(source),
                    run_layout,
                    budget=budget,
                    workers=workers,
                )
            else:
                report = convert_directory(
                    bridge.groups,
                    reader,
                    staging,
                    lambda g, ts: g.to_megatron(ts, options),
                    source_side="hf",
                    target_side="megatron",
                    max_shard_bytes=max_shard_bytes,
                    index_metadata={"format": record.format},
                    progress=progress,
                    opener=opener,
                    budget=budget,
                    workers=workers,
                )
            with workers.step():
                if workers.first:
                    keep_hf_files(Path(source), staging)
                    if output_format != "torch_dist":  # a run tree keeps them by its iteration
                        copy_tokenizer_files(Path(source), staging / TOKENIZER_FOLDER)
                    record.write(staging)
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
    fp8_tensors: Sequence[str] = (),
    options: ConvertOptions = ConvertOptions(),
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    """The Megatron checkpoint written by `hf_to_megatron` -> HF shards, index and config.

    With a quantised bridge, the tensors named in `fp8_tensors` are quantised back to FP8 (with
    their scales); otherwise the checkpoint is written unquantised and its config says so.
    """
    stage = None
    if bridge.quantization is not None:
        elsewhere = sorted(
            name
            for name in fp8_tensors
            if name not in bridge.hf_shapes or len(bridge.hf_shapes[name]) < 2
        )
        if elsewhere:
            raise ConversionError(
                f"{elsewhere[0]}: quantised in the FP8 source but not a tensor of this export; "
                "re-quantising needs the source's expert layouts (drop --experts/--mtp-experts)"
            )
        stage = Requantize(set(fp8_tensors), tuple(bridge.quantization["weight_block_size"]))
    root = record_root(Path(source))
    if root is None:
        raise ConversionError(f"{source}: no {RECORD_NAME}; not written by codegen convert")
    with ExitStack() as stack:
        stack.enter_context(outputs_from(ReadBuffers().empty))  # no page faults per group
        with workers.step():
            reader = stack.enter_context(megatron_reader(bridge, Path(source)))
            check_source(reader, bridge.megatron_shapes, "Megatron")
        with staged_directory(destination, workers, force=force, source=root) as staging:
            report = convert_directory(
                bridge.groups,
                reader,
                staging,
                lambda g, ts: g.to_hf(ts, options),
                source_side="megatron",
                target_side="hf",
                max_shard_bytes=max_shard_bytes,
                index_metadata={},
                progress=progress,
                opener=opener,
                stage=stage,
                budget=budget,
                workers=workers,
            )
            with workers.step():
                if workers.first:
                    restore_hf_files(root, staging, quantized=stage is not None)
                    copy_tokenizer_files(reader.directory / TOKENIZER_FOLDER, staging)
    return report


def live_to_hf(
    bridge: BridgeBase,
    model: Any,
    destination: Path,
    *,
    config_dir: Path,
    prefix: str,
    receiver: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    options: ConvertOptions = ConvertOptions(),
) -> Report | None:
    """A live, sharded model written as an HF checkpoint folder by one rank, from the stream.

    Every rank calls it; the ranks holding each tensor send it to `receiver`, which writes the
    shards as the tensors arrive (memory: one group) and copies `config.json` (and
    `generation_config.json`) from `config_dir`. Returns the report on `receiver`, None elsewhere.
    """
    from qwen35_bridge.megatron import stream

    placement = stream.placement_of(bridge, model, prefix, receiver)
    tensors = stream.iter_hf(bridge, model, prefix=prefix, options=options, placement=placement)
    if not placement.receives:
        collections.deque(tensors, maxlen=0)
        return None
    planned = [Planned(n, d, s) for n, s, d in stream.hf_plan(bridge, placement, prefix)]
    with staged_directory(destination, SINGLE, force=force, source=None) as folder:
        writer = StreamingWriter(folder, plan_shards(planned, max_shard_bytes))
        try:
            for name, tensor in tensors:
                writer.write(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_index(folder, writer.weight_map, writer.bytes_written)
        copy_hf_config(Path(config_dir), folder)
    return Report(0, len(planned), writer.bytes_written)


def training_to_hf(
    bridge: BridgeBase,
    source: Path,
    destination: Path,
    *,
    config: dict[str, Any],
    config_dir: Path | None = None,
    iteration: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    progress: Progress = Progress(),
    options: ConvertOptions = ConvertOptions(),
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    """A trainer's checkpoint (a Megatron-LM or Megatron-Bridge run root, or one of its iteration
    folders; torch_dist or the legacy `torch` format) -> HF shards, index, `config`, and the
    tokenizer's files (the run's own, else those of `config_dir`). The model's tensors must be
    exactly the bridge's; optimizer and RNG state are never read and are listed in the report."""
    with ExitStack() as stack:
        stack.enter_context(outputs_from(ReadBuffers().empty))  # no page faults per group
        with workers.step():
            reader = stack.enter_context(training_reader(bridge, Path(source), iteration))
            check_source(reader, bridge.megatron_shapes, "Megatron")
        with staged_directory(destination, workers, force=force, source=Path(source)) as staging:
            report = convert_directory(
                bridge.groups,
                reader,
                staging,
                lambda g, ts: g.to_hf(ts, options),
                source_side="megatron",
                target_side="hf",
                max_shard_bytes=max_shard_bytes,
                index_metadata={},
                progress=progress,
                budget=budget,
                workers=workers,
            )
            with workers.step():
                if workers.first:
                    write_hf_config(config, staging, config_dir)
                    tokenizer = reader.directory / TOKENIZER_FOLDER
                    copy_tokenizer_files(tokenizer if tokenizer.is_dir() else config_dir, staging)
        return replace(
            report,
            ignored=tuple(reader.ignored),
            notes=tuple(reader.notes),
            folder=reader.directory,
        )


@contextmanager
def training_reader(
    bridge: BridgeBase, source: Path, iteration: int | None = None
) -> Iterator[TensorReader]:
    """The model tensors of a trainer's checkpoint, whichever its format; a Megatron-Bridge
    iteration's run_config.yaml must describe the bridge's model."""
    from qwen35_bridge.formats import megatron_torch, torch_dist

    folder = megatron_lm.resolve_iteration(source, iteration)
    section = megatron_bridge.read_model_section(folder)
    if section is not None:
        if bridge.target != "gpt":
            raise ConversionError(
                f"{folder}: a Megatron-Bridge run (run_config.yaml) is read for GPTModel only; "
                f"this bridge's target is {bridge.target}"
            )
        architecture = torch_dist.layout(bridge).architecture
        megatron_bridge.check_model_section(section, architecture, bridge.model_args, folder)
    if megatron_lm.is_torch_dist(folder):
        with torch_dist.Reader(bridge, folder, training=True) as reader:
            yield reader
    else:
        with megatron_torch.Reader(bridge, folder) as reader:
            yield reader


class Requantize(OutputStage):
    """Quantise the named tensors to FP8 blocks, each followed by its `_scale_inv`."""

    def __init__(self, names: set[str], block: tuple[int, int]) -> None:
        self.names, self.block = names, block

    def plan(self, planned: Planned) -> list[Planned]:
        if planned.name not in self.names:
            return [planned]
        scale = Planned(
            fp8.scale_name(planned.name), torch.float32, fp8.scale_shape(planned.shape, self.block)
        )
        return [Planned(planned.name, fp8.FP8, planned.shape), scale]

    def apply(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if name not in self.names:
            return {name: tensor}
        weight, scale = fp8.quantize(tensor, self.block)
        return {name: weight, fp8.scale_name(name): scale}


def write_run(
    bridge: BridgeBase,
    reader: TensorReader,
    staging: Path,
    options: ConvertOptions,
    progress: Progress,
    source: Path | None,
    run_layout: str,
    *,
    megatron_source: bool = False,
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    """A run root as the trainer writes one: the tracker, and the iteration folder with the
    torch_dist checkpoint, whose common state holds Megatron-LM's args, checkpoint version and
    iteration (inside the data file, where megatron-core 0.19 keeps it), and the source's
    tokenizer files; Megatron-Bridge's run also gets its run_config.yaml and train state. The
    model's flags for Megatron-LM's `pretrain_gpt.py` go beside the tracker (GPTModel bridges
    only: a HybridModel run's args record its layer pattern instead). `megatron_source`: the
    reader holds the bridge's Megatron tensors already (a layout conversion), not HF ones."""
    from qwen35_bridge.formats import torch_dist

    if bridge.target != "gpt" and run_layout == RUN_MEGATRON_BRIDGE:
        raise ConversionError(
            f"--run-layout {run_layout}: written for GPTModel only; this bridge's target is "
            f"{bridge.target}"
        )
    plan = torch_dist.layout(bridge)
    args = megatron_lm.training_args(plan.architecture, bridge.model_args)
    if bridge.target == "hybrid":
        args.hybrid_layer_pattern = bridge.hybrid_layer_pattern
    common = megatron_lm.common_state(args, iteration=0)
    name = megatron_lm.RELEASE if run_layout == RUN_MEGATRON_LM else 0
    folder = staging / megatron_lm.iteration_folder(name)
    with workers.step():
        if workers.first:
            folder.mkdir()
    report = _write_torch_dist(
        bridge,
        reader,
        folder,
        options,
        progress,
        common,
        megatron_source=megatron_source,
        budget=budget,
        workers=workers,
    )
    with workers.step():
        if workers.first:
            _write_run_files(bridge, plan, staging, folder, source, run_layout, name)
    return report


def _write_run_files(
    bridge: BridgeBase,
    plan: Any,
    staging: Path,
    folder: Path,
    source: Path | None,
    run_layout: str,
    name: int | str,
) -> None:
    """What a run tree holds beside the checkpoint: tokenizer files, Megatron-Bridge's records,
    the tracker, and the model's flags for `pretrain_gpt.py`."""
    copy_tokenizer_files(source, folder / TOKENIZER_FOLDER)
    if run_layout == RUN_MEGATRON_BRIDGE:
        section = megatron_bridge.model_section(
            plan.architecture,
            bridge.model_args,
            model_id=bridge.model_id,
            vision_language=bridge.is_vl,
        )
        megatron_bridge.write_run_config(folder, section)
        megatron_bridge.write_train_state(folder / megatron_bridge.TRAIN_STATE_NAME, step=0)
        shutil.copyfile(
            folder / megatron_bridge.TRAIN_STATE_NAME,
            staging / megatron_bridge.LATEST_TRAIN_STATE_NAME,
        )
    megatron_lm.write_tracker(staging, name)
    if bridge.target == "gpt":
        words = megatron_lm.pretrain_gpt_flags(plan.architecture, bridge.model_args)
        (staging / megatron_lm.PRETRAIN_ARGS_NAME).write_text("".join(f"{w}\n" for w in words))


def _write_torch_dist(
    bridge: BridgeBase,
    reader: TensorReader,
    folder: Path,
    options: ConvertOptions,
    progress: Progress,
    common: dict[str, Any],
    *,
    megatron_source: bool = False,
    budget: int | None = DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> Report:
    from qwen35_bridge.formats import torch_dist

    side = "megatron" if megatron_source else "hf"
    planned = [plan([g], reader, side, "megatron") for g in bridge.groups]
    dtypes = {p.name: p.dtype for ps in planned for p in ps}
    run = workers.share([sum(p.nbytes for p in ps) for ps in planned])
    mine = {p.name for i in run for p in planned[i]}
    source = ConvertedTensors(
        bridge.groups, reader, options, budget, megatron_source=megatron_source
    )
    progress.start(len(mine), sum(p.nbytes for i in run for p in planned[i]))
    try:
        written = torch_dist.write(
            bridge,
            folder,
            source,
            dtypes.__getitem__,
            on_chunk=lambda n: progress.advance(0, n),
            common_state=common,
            workers=workers,
            mine=mine.__contains__,
        )
    finally:
        progress.finish()
    read = len(dtypes) if megatron_source else len(bridge.hf_shapes)
    return Report(read, len(dtypes), written)


def record_root(path: Path) -> Path | None:
    """The folder holding the record of a checkpoint `hf_to_megatron` wrote: `path` itself, or,
    for the iteration folder of such a run tree, its run root. None for anything else (a
    trainer's checkpoint)."""
    path = Path(path)
    if (path / RECORD_NAME).is_file():
        return path
    if megatron_lm.is_iteration(path) and (path.parent / RECORD_NAME).is_file():
        return path.parent
    return None


@contextmanager
def megatron_reader(
    bridge: BridgeBase, source: Path, iteration: int | None = None
) -> Iterator[TensorReader]:
    """The tensors of a Megatron checkpoint: one `hf_to_megatron` wrote (safetensors, or
    torch_dist in its run tree or, as written before, a bare folder), or a trainer's (see
    `training_reader`)."""
    source = Path(source)
    root = record_root(source)
    if root is None:
        with training_reader(bridge, source, iteration) as reader:
            yield reader
    elif Record.read(root).format == FORMAT_TORCH_DIST:
        from qwen35_bridge.formats import torch_dist

        folder = source if root != source else megatron_lm.resolve_iteration(root, iteration)
        with torch_dist.Reader(bridge, folder) as reader:
            yield reader
    else:
        with CheckpointReader(root) as reader:
            yield reader
