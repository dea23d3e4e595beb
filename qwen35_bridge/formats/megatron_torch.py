"""Megatron-LM's legacy `torch` checkpoint format, read back as whole tensors under the bridge's names.

An iteration folder holds one folder per model-parallel rank, `mp_rank_TT` (tensor rank),
`mp_rank_TT_PPP` (and pipeline rank) and, with expert parallelism, `mp_rank_TT_PPP_EEE` or
`mp_rank_TT_EEE`, each with a `model_optim_rng.pt` that `torch.save` wrote. Its `model` (or, with
virtual pipeline stages, `model0`, `model1`, ...) is that rank's plain state dict: its tensor-parallel
slices, its pipeline stage's layers numbered from 0 in each chunk, its expert-parallel rank's experts
numbered from 0. This reader puts them back together (docs/reference.md section 11): slices merged
with each tensor's own split rule, layers renumbered in the order Megatron assigns them (chunk by
chunk, stage by stage), experts shifted by their rank's offset. The optimizer state, RNG state and
`_extra_state` entries beside them are never read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats import lazy_pickle
from qwen35_bridge.formats.buffers import ReadBuffers
from qwen35_bridge.formats.lazy_pickle import LazyTensor
from qwen35_bridge.formats.megatron_lm import LEGACY_RANK_FOLDER, padded_vocabulary, padding_note
from qwen35_bridge.mapping import names as megatron_names

if TYPE_CHECKING:
    from qwen35_bridge.bridge import BridgeBase

RANK_FILE = "model_optim_rng.pt"
_CHUNK_KEY = re.compile(r"^model(\d*)$")
#: A routed expert of megatron-core's SequentialMLP (no grouped GEMM), renamed to the grouped form.
_SEQUENTIAL_EXPERT = re.compile(
    r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$"
)


@dataclass(frozen=True)
class _Rank:
    tp: int
    pp: int
    ep: int
    path: Path


@dataclass
class _Shard:
    """One rank's slice of a tensor: which file and local key it is, and its tensor (mapped)."""

    rank: _Rank
    local_name: str
    tensor: LazyTensor


@dataclass
class _Tensor:
    """Where a global tensor lies: for each pipeline stage (and chunk) holding a copy, its
    tensor-parallel slices in rank order."""

    copies: dict[tuple[int, int], dict[int, _Shard]] = field(default_factory=dict)


def _sizes(ranks: Iterable[_Rank]) -> tuple[int, int, int]:
    ranks = list(ranks)
    return tuple(1 + max(getattr(r, axis) for r in ranks) for axis in ("tp", "pp", "ep"))


def _rank_folders(folder: Path, args: Any) -> list[_Rank]:
    """The rank folders with their (tp, pp, ep) ranks. `mp_rank_TT_NNN` is a pipeline rank, or
    an expert rank when the run had no pipeline parallelism: the checkpoint's `args` say which
    (else the folders do: only a pipeline's last stage holds the final norm)."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        match = LEGACY_RANK_FOLDER.match(path.name)
        if match and (path / RANK_FILE).is_file():
            found.append((path, int(match[1]), match[2], match[3]))
    if not found:
        raise ConversionError(f"{folder}: no mp_rank_* folders with {RANK_FILE}")
    if len({m[3] is None for m in found}) > 1 or len({m[2] is None for m in found}) > 1:
        raise ConversionError(f"{folder}: mp_rank_* folders named in different ways")
    ranks = []
    second_is_pipeline = None
    for path, tp, second, third in found:
        if third is not None:
            ranks.append(_Rank(tp, int(second), int(third), path))
            continue
        if second is None:
            ranks.append(_Rank(tp, 0, 0, path))
            continue
        if second_is_pipeline is None:
            second_is_pipeline = _second_number_is_pipeline(args, folder)
        number = int(second)
        ranks.append(
            _Rank(
                tp, number if second_is_pipeline else 0, 0 if second_is_pipeline else number, path
            )
        )
    sizes = _sizes(ranks)
    expected = {
        (t, p, e) for t in range(sizes[0]) for p in range(sizes[1]) for e in range(sizes[2])
    }
    missing = sorted(expected - {(r.tp, r.pp, r.ep) for r in ranks})
    if missing:
        t, p, e = missing[0]
        raise ConversionError(
            f"{folder}: the folder of tensor rank {t}, pipeline rank {p}, expert rank {e} is missing "
            f"(a {sizes[0]} x {sizes[1]} x {sizes[2]} checkpoint needs all of them)"
        )
    return ranks


def _second_number_is_pipeline(args: Any, folder: Path) -> bool:
    pp = getattr(args, "pipeline_model_parallel_size", None)
    ep = getattr(args, "expert_model_parallel_size", None)
    if isinstance(pp, int) and pp > 1:
        return True
    if isinstance(ep, int) and ep > 1:
        return False
    raise ConversionError(
        f"{folder}: mp_rank_TT_NNN folders without the run's args; cannot tell pipeline from "
        "expert ranks"
    )


class Reader:
    """Whole Megatron tensors (the bridge's names) from a legacy `torch` iteration folder."""

    def __init__(self, bridge: BridgeBase, folder: Path) -> None:
        self.directory = Path(folder)
        self.ignored: list[str] = []
        self.notes: list[str] = []
        self._bridge = bridge
        self._prefix = bridge.megatron_prefix
        self._archives: list[lazy_pickle.TorchSaveFile] = []
        self._buffers = ReadBuffers()  # one pool for every rank's file
        self._tensors: dict[str, _Tensor] = {}
        try:
            self._index(self._open_ranks())
        except BaseException:
            self.close()
            raise
        self._shapes = {name: self._shape(name, t) for name, t in self._tensors.items()}

    def _open_ranks(self) -> dict[_Rank, Any]:
        """Every rank's file, opened (its pickle read, no tensor), by rank."""
        files = sorted(
            p / RANK_FILE for p in self.directory.iterdir() if LEGACY_RANK_FOLDER.match(p.name)
        )
        if not files or not files[0].is_file():
            raise ConversionError(f"{self.directory}: no mp_rank_* folders with {RANK_FILE}")
        opened = {}
        for path in files:
            state, archive = lazy_pickle.load(path, self._buffers)
            self._archives.append(archive)
            opened[path] = state
        first = opened[files[0]]
        ranks = _rank_folders(
            self.directory, first.get("args") if isinstance(first, dict) else None
        )
        return {rank: opened[rank.path / RANK_FILE] for rank in ranks}

    def _index(self, states: dict[_Rank, Any]) -> None:
        """Where each global tensor's slices are, without reading any."""
        experts = _experts_per_layer(self._bridge)
        ep = _sizes(states)[2]
        if experts % ep:
            raise ConversionError(
                f"{self.directory}: {ep} expert ranks cannot hold {experts} experts evenly"
            )
        chunks = {r: self._chunks(r, state) for r, state in states.items()}
        offsets = _layer_offsets(chunks, self._prefix)
        for rank, rank_chunks in chunks.items():
            for vp, state in rank_chunks.items():
                for local, tensor in state.items():
                    if local.endswith("_extra_state"):
                        continue
                    if not isinstance(tensor, LazyTensor):
                        raise ConversionError(
                            f"{rank.path / RANK_FILE}: model entry {local} is a "
                            f"{type(tensor).__name__}, not a tensor"
                        )
                    name = self._global_name(
                        local, offsets[(vp, rank.pp)], rank.ep * (experts // ep)
                    )
                    copies = self._tensors.setdefault(name, _Tensor()).copies
                    # A tensor outside the experts is on every expert rank: the first is taken.
                    copies.setdefault((rank.pp, vp), {}).setdefault(
                        rank.tp, _Shard(rank, local, tensor)
                    )

    # -- reading the rank files --------------------------------------------------------------------

    def _chunks(self, rank: _Rank, state: Any) -> dict[int, dict[str, Any]]:
        """The model chunks of one rank file, by virtual-pipeline index; the rest is left out."""
        path = rank.path / RANK_FILE
        if not isinstance(state, dict):
            raise ConversionError(f"{path}: not a Megatron checkpoint (no state dict)")
        chunks = {}
        for key, value in state.items():
            match = _CHUNK_KEY.match(str(key))
            if match is None:
                if rank.tp == rank.pp == rank.ep == 0:
                    self.ignored.append(str(key))
                continue
            if not isinstance(value, dict):
                raise ConversionError(f"{path}: {key} is not a state dict")
            chunks[int(match[1] or 0)] = value
        if not chunks:
            raise ConversionError(f"{path}: no model state ('model' or 'model0', 'model1', ...)")
        if sorted(chunks) != list(range(len(chunks))):
            raise ConversionError(f"{path}: model chunks {sorted(chunks)} are not numbered from 0")
        return chunks

    def _global_name(self, local: str, layer_offset: int, expert_offset: int) -> str:
        prefix = self._prefix if local.startswith(self._prefix) else ""
        name = _SEQUENTIAL_EXPERT.sub(r".mlp.experts.\2.\3\1", local[len(prefix) :])
        name = megatron_names.renumber_layer(name, lambda i: i + layer_offset)
        return prefix + megatron_names.renumber_expert(name, expert_offset)

    # -- shapes and merging ------------------------------------------------------------------------

    def _shape(self, name: str, where: _Tensor) -> tuple[int, ...]:
        """The tensor's whole shape, from its slices' shapes (nothing is read)."""
        shards = min(where.copies.items())[1]
        tps = sorted(shards)
        if tps != list(range(len(tps))):
            raise ConversionError(
                f"{name}: slices of tensor ranks {tps} in {self.directory}; every rank's is needed"
            )
        shape = list(shards[0].tensor.shape)
        split = self._bridge.splits.get(name)
        if not self._replicated(name, shards) and split is not None and split.dim is not None:
            shape[split.dim] = sum(s.tensor.shape[split.dim] for s in shards.values())
        return self._trimmed(name, tuple(shape))

    def _replicated(self, name: str, shards: dict[int, _Shard]) -> bool:
        """One slice, or every tensor rank holding the whole tensor (norms; experts without
        expert tensor parallelism)."""
        expected = self._bridge.megatron_shapes.get(name)
        return len(shards) == 1 or expected is None or tuple(shards[0].tensor.shape) == expected

    def _trimmed(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A vocabulary tensor padded by the trainer (Megatron-LM pads the vocabulary to a
        multiple of 128 times its tensor-parallel size) has the bridge's rows: the padding rows
        are dropped, and a note says so."""
        expected = self._bridge.megatron_shapes.get(name)
        if expected is None or not padded_vocabulary(self._bridge.splits[name], shape, expected):
            return shape
        note = padding_note(shape[0], expected[0])
        if note not in self.notes:
            self.notes.append(note)
        return expected

    def _merge(self, name: str, shards: dict[int, _Shard]) -> torch.Tensor:
        if self._replicated(name, shards):
            full = shards[0].tensor.read()
        else:
            slices = [shards[tp].tensor.read() for tp in sorted(shards)]
            full = self._bridge.splits[name].merge(slices)
        rows = self._shapes[name][0] if full.dim() else None
        return full[:rows] if rows is not None and full.shape[0] > rows else full

    # -- TensorReader ------------------------------------------------------------------------------

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return next(iter(min(self._tensors[name].copies.items())[1].values())).tensor.dtype

    def file(self, name: str) -> str:
        shard = next(iter(min(self._tensors[name].copies.items())[1].values()))
        return str(shard.rank.path.relative_to(self.directory) / RANK_FILE)

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor; where several pipeline stages hold a copy (the embedding beside MTP,
        a tied output layer), the copies must be equal, or the checkpoint is refused."""
        copies = sorted(self._tensors[name].copies.items())
        full = self._merge(name, copies[0][1])
        for (pp, _vp), shards in copies[1:]:
            if not torch.equal(self._merge(name, shards), full):
                raise ConversionError(
                    f"{name}: the copies on pipeline stages {copies[0][0][0]} and {pp} differ in "
                    f"{self.directory}; the trainer did not keep them in sync"
                )
        return full

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)`: of a tensor held whole by one rank (or cut by rows over tensor
        ranks), only those rows are read; otherwise the whole tensor is merged first."""
        copies = sorted(self._tensors[name].copies.items())
        shards = copies[0][1]
        split = self._bridge.splits.get(name)
        if len(copies) > 1 or not (
            self._replicated(name, shards)
            or (split is not None and split.dim == 0 and split.sections == 1)
        ):
            return self.get(name)[start:stop]
        pieces, first = [], 0
        for tp in sorted(shards) if not self._replicated(name, shards) else [0]:
            lazy = shards[tp].tensor
            low, high = max(start, first), min(stop, first + lazy.shape[0])
            if low < high:
                pieces.append(lazy.rows(low - first, high - first).read())
            first += lazy.shape[0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def close(self) -> None:
        self._tensors.clear()
        for archive in self._archives:
            archive.close()
        self._archives.clear()
        self._buffers.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _experts_per_layer(bridge: BridgeBase) -> int:
    numbers = {
        e for name in bridge.megatron_shapes if (e := megatron_names.expert_of(name)) is not None
    }
    return max(numbers) + 1 if numbers else 1


def _layer_offsets(
    chunks: dict[_Rank, dict[int, dict[str, Any]]], prefix: str
) -> dict[tuple[int, int], int]:
    """The global number of each (chunk, stage)'s first decoder layer: Megatron gives layers to
    chunk 0 of every stage in stage order, then chunk 1 of every stage, and so on."""
    counts: dict[tuple[int, int], int] = {}
    for rank, rank_chunks in chunks.items():
        for vp, state in rank_chunks.items():
            numbers = {megatron_names.layer_of(k.removeprefix(prefix)) for k in state}
            numbers.discard(None)
            count = 1 + max(numbers) if numbers else 0
            if counts.setdefault((vp, rank.pp), count) != count:
                raise ConversionError(
                    f"{rank.path / RANK_FILE}: chunk {vp} holds {count} decoder layers, another "
                    f"rank of pipeline stage {rank.pp} {counts[(vp, rank.pp)]}"
                )
    offsets, total = {}, 0
    for key in sorted(counts):
        offsets[key] = total
        total += counts[key]
    return offsets
