"""What a conversion will do, before it reads a tensor: bytes in all and per worker, the most it
holds in memory at once, and the files it writes (`codegen convert --plan`).

The plan comes from the bridge's table and the tensors' dtypes alone (a checkpoint's headers, or a
config's dtype when there is no checkpoint), by the same rules the conversion follows: groups
shared among workers by bytes, shards cut at `--max-shard-size`, groups larger than the memory
budget converted in parts. So it can be made for a 2-trillion-parameter model on a laptop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qwen35_bridge.formats.safetensors.writer import Planned, plan_shards, shard_file_names
from qwen35_bridge.mapping.kinds import Group
from qwen35_bridge.workers import shares


@dataclass(frozen=True)
class WorkerPlan:
    rank: int
    groups: int
    tensors: int
    bytes: int
    files: tuple[str, ...]
    chunks: int | None = None  # torch_dist: the layout's chunks this worker writes


@dataclass(frozen=True)
class ConversionPlan:
    tensors: int
    bytes: int
    workers: tuple[WorkerPlan, ...]
    held_bytes: int  # the most one worker holds of converted tensors at once
    held_by: str  # the group (its first tensor) that holds it
    parts: int  # groups converted in parts
    files: tuple[str, ...]  # every file written, the data files first

    def render(self) -> str:
        lines = [
            f"{self.tensors} tensors, {_size(self.bytes)} written by {len(self.workers)} "
            f"worker{'s' if len(self.workers) > 1 else ''}",
            f"held in memory at once: at most {_size(self.held_bytes)} of tensors ({self.held_by})"
            + (f"; {self.parts} groups converted in parts" if self.parts else ""),
            f"{'worker':>6} {'groups':>7} {'tensors':>8} {'chunks':>7} {'bytes':>11}  files",
        ]
        for w in self.workers:
            shown = ", ".join(w.files[:2]) + (f", ... ({len(w.files)})" if len(w.files) > 2 else "")
            chunks = "-" if w.chunks is None else w.chunks
            lines.append(
                f"{w.rank:>6} {w.groups:>7} {w.tensors:>8} {chunks:>7} {_size(w.bytes):>11}  {shown}"
            )
        lines.append(f"files: {len(self.files)} ({', '.join(self.files[-4:])} last)")
        return "\n".join(lines) + "\n"


def _size(nbytes: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def part_step(group: Group, nbytes: int, budget: int | None) -> int | None:
    """Rows (experts) per part when `group`, of `nbytes` on the side read, is converted in parts
    under `budget`; None when it is converted whole (it fits, or cannot be split).

    The budget holds what is read and what it converts into (a packed expert tensor stacked from
    per-expert ones is a copy), so a group converts whole when twice its bytes fit, and otherwise
    in parts of even size, each at most half the budget (or one row, where a row is larger)."""
    if budget is None or not group.rows or group.part is None or 2 * nbytes <= budget:
        return None
    most = max(1, budget // 2 // math.ceil(nbytes / group.rows))
    parts = math.ceil(group.rows / most)
    return math.ceil(group.rows / parts)


def held(
    group: Group, dtype_of: Callable[[str], torch.dtype], side: str, budget: int | None
) -> tuple[int, bool]:
    """The bytes the conversion holds for `group` at once (what it reads, and as much again for
    what that converts into), and whether it is converted in parts."""
    whole = sum(_bytes(shape, dtype_of(n)) for n, shape in getattr(group, side).items())
    step = part_step(group, whole, budget)
    read = whole if step is None else math.ceil(whole / group.rows) * step
    return 2 * read, step is not None


def plan_conversion(
    groups: Sequence[Group],
    dtype_of: Callable[[str], torch.dtype],
    *,
    source_side: str,
    target_side: str,
    output_format: str,
    max_shard_bytes: int,
    budget: int | None,
    workers: int,
    data_folder: str = "",
    extra_files: Sequence[str] = (),
    chunks_of: Callable[[str], int] | None = None,
) -> ConversionPlan:
    """The plan of converting `groups` (their `source_side` tensors of `dtype_of`'s dtypes) into
    `output_format` ("safetensors", or "torch_dist" in `data_folder`, whose layout has
    `chunks_of(name)` chunks of each tensor) by `workers` workers."""
    planned = [
        [
            Planned(name, dtype_of(next(iter(getattr(g, source_side)))), tuple(shape))
            for name, shape in getattr(g, target_side).items()
        ]
        for g in groups
    ]
    runs = shares([sum(p.nbytes for p in ps) for ps in planned], workers)
    if output_format == "torch_dist":
        per_worker = [(f"{data_folder}__{rank}_0.distcp",) for rank in range(workers)]
        data = [f for files in per_worker for f in files]
        files = [*data, f"{data_folder}.metadata", f"{data_folder}metadata.json"]
    else:
        shards = [
            plan_shards([p for i in run for p in planned[i]], max_shard_bytes) for run in runs
        ]
        names = shard_file_names(sum(len(s) for s in shards))
        per_worker, first = [], 0
        for rank_shards in shards:
            per_worker.append(tuple(names[first : first + len(rank_shards)]))
            first += len(rank_shards)
        files = [*names, "model.safetensors.index.json"]
    holding = [held(g, dtype_of, source_side, budget) for g in groups]
    most = max(range(len(groups)), key=lambda i: holding[i][0])
    return ConversionPlan(
        tensors=sum(len(ps) for ps in planned),
        bytes=sum(p.nbytes for ps in planned for p in ps),
        workers=tuple(
            WorkerPlan(
                rank,
                len(run),
                sum(len(planned[i]) for i in run),
                sum(p.nbytes for i in run for p in planned[i]),
                per_worker[rank],
                (
                    None
                    if chunks_of is None
                    else sum(chunks_of(p.name) for i in run for p in planned[i])
                ),
            )
            for rank, run in enumerate(runs)
        ),
        held_bytes=holding[most][0],
        held_by=next(iter(getattr(groups[most], source_side))),
        parts=sum(split for _, split in holding),
        files=tuple([*files, *extra_files]),
    )
