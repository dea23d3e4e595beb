"""Stream the weights of a live, sharded megatron-core model one mapping group at a time.

This is the path RL weight sync takes (trainer -> inference engine every few steps) and the one
`export_hf` / `export_megatron` are built on: nothing holds the whole model. For each tensor of
each group, in the bridge's table order (which every rank has, so no rank asks another what comes
next), the ranks that hold it gather their tensor-parallel slices, the lowest of them (the owning
pipeline stage, the owning expert-parallel rank) sends the full tensor to the receivers, and the
group is converted to HF on arrival. Who holds what is exchanged once, at the start, in a compact
form (layer numbers, an expert range, the few names outside decoder layers), not per tensor.

Memory beyond the model: one group's full Megatron tensors and their HF form (one expert's, when
packed experts are streamed per expert), plus the bucket being filled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping import names
from qwen35_bridge.mapping.kinds import ConvertOptions, Group
from qwen35_bridge.megatron.live import Model, global_parameters

if TYPE_CHECKING:
    from qwen35_bridge.mapping.table import MappingTable

ExpertsLayout = Literal["packed", "per_expert"]
_PER_EXPERT_HF = re.compile(r"\.mlp\.experts\.\d+\.")
Named = tuple[str, Tensor]


@dataclass(frozen=True)
class Holdings:
    """What one rank holds, in the form every rank sends every other once."""

    rank: int
    layers: frozenset[int]  # global decoder layer numbers
    experts: tuple[int, int] | None  # [first, last] global expert numbers of its decoder layers
    other: frozenset[str]  # global names outside decoder layers (embedding, MTP, vision, ...)
    tp_ranks: tuple[int, ...]  # global ranks of its tensor-parallel group
    etp_ranks: tuple[int, ...]  # ... and of its expert-tensor-parallel group
    dtype: str  # the dtype of its parameters
    other_dtypes: dict[str, str]  # names whose dtype is not `dtype`

    def holds(self, name: str, layer: int | None, expert: int | None) -> bool:
        if layer is None:
            return name in self.other
        if layer not in self.layers:
            return False
        return expert is None or (
            self.experts is not None and self.experts[0] <= expert <= self.experts[1]
        )

    def dtype_of(self, name: str) -> torch.dtype:
        return getattr(torch, self.other_dtypes.get(name, self.dtype))


class Placement:
    """Where every tensor of the model lives, agreed by all ranks; fetches full tensors."""

    def __init__(
        self,
        bridge: MappingTable,
        params: dict[str, list[torch.nn.Parameter]],
        *,
        receiver: int | None,
        device: torch.device,
    ) -> None:
        self._bridge = bridge
        self._params = params
        self._receiver = receiver
        self._device = device
        self._splits = bridge.splits
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        mine = _holdings(self.rank, params, bridge.megatron_prefix)
        if self.world == 1:
            self._all = [mine]
        else:
            gathered: list[Holdings | None] = [None] * self.world
            dist.all_gather_object(gathered, mine)
            self._all = [h for h in gathered if h is not None]

    @property
    def receives(self) -> bool:
        """Whether this rank gets the streamed tensors."""
        return self._receiver is None or self._receiver == self.rank

    def fetch(self, name: str) -> Tensor | None:
        """The full tensor `name` on a receiving rank (None elsewhere). Every rank must call this
        for every name, in the same order."""
        source, expert = self._source(name)
        group_ranks = source.etp_ranks if expert else source.tp_ranks
        if self._receiver is None and len(group_ranks) == self.world:
            # Every rank holds a slice (or a copy): gathering is all it takes.
            return self._gathered(name, group_ranks, expert, keep=True)
        full = self._gathered(name, group_ranks, expert, keep=self.rank == source.rank)
        return self._sent(name, full, source)

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype of a Megatron tensor, wherever it lives (no communication)."""
        return self._source(name)[0].dtype_of(name)

    def _source(self, name: str) -> tuple[Holdings, bool]:
        """The rank that sends `name` (the lowest holding it), and whether it is an expert's."""
        layer, expert = _layer_and_expert(name, self._bridge.megatron_prefix)
        holders = [h for h in self._all if h.holds(name, layer, expert)]
        if not holders:
            raise ConversionError(f"{name}: no rank of the model holds this tensor")
        return holders[0], expert is not None or names.is_expert(name)

    def _gathered(
        self, name: str, group_ranks: tuple[int, ...], expert: bool, *, keep: bool
    ) -> Tensor | None:
        """The full tensor, its TP slices gathered over the source's TP (or ETP) group, whose
        members take part; returned where `keep` (a copy, never the parameter itself)."""
        if self.rank not in group_ranks:
            return None
        local = self._params[name][0].detach()
        split = self._splits[name]
        if len(group_ranks) == 1 or split.dim is None:
            return local.clone() if keep else None
        from megatron.core import parallel_state as ps

        group = (
            ps.get_expert_tensor_parallel_group()
            if expert
            else ps.get_tensor_model_parallel_group()
        )
        pieces = [torch.empty_like(local) for _ in group_ranks]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return split.merge(pieces) if keep else None

    def _sent(self, name: str, full: Tensor | None, source: Holdings) -> Tensor | None:
        """`full` (on the source rank) moved to the receivers: all ranks, or the one receiver."""
        if self.world == 1 or source.rank == self._receiver:
            return full
        if self._receiver is None:
            if full is None:
                shape = self._bridge.megatron_shapes[name]
                full = torch.empty(shape, dtype=source.dtype_of(name), device=self._device)
            else:
                full = full.contiguous()
            dist.broadcast(full, src=source.rank)
            return full
        if self.rank == source.rank:
            assert full is not None
            dist.send(full.contiguous(), dst=self._receiver)
            return None
        if self.rank == self._receiver:
            shape = self._bridge.megatron_shapes[name]
            buffer = torch.empty(shape, dtype=source.dtype_of(name), device=self._device)
            dist.recv(buffer, src=source.rank)
            return buffer
        return None


def iter_megatron(
    bridge: MappingTable,
    model: Model,
    *,
    prefix: str,
    receiver: int | None = None,
) -> Iterator[Named]:
    """`(megatron_name, full_tensor)` for every tensor under `prefix`, in table order."""
    placement = _placement(bridge, model, prefix, receiver)
    for group in bridge.under(prefix):
        for name in group.megatron:
            tensor = placement.fetch(name)
            if tensor is not None:
                yield name, tensor


def iter_hf(
    bridge: MappingTable,
    model: Model,
    *,
    prefix: str,
    experts: ExpertsLayout | None = None,
    receiver: int | None = None,
    options: ConvertOptions = ConvertOptions(),
    placement: Placement | None = None,
) -> Iterator[Named]:
    """`(hf_name, tensor)` for every HF tensor under `prefix`, group by group (`placement`, when
    given, is one made by `placement_of` for the same model). `experts` is the
    bridge's own HF layout by default; "per_expert" streams packed experts one expert at a time
    (the packed tensor is never assembled)."""
    layout = hf_experts_layout(bridge)
    if experts == "packed" and layout == "per_expert":
        raise ValueError(
            f"{bridge.model_id}: its HF checkpoints store routed experts per expert, so there is "
            "no packed HF form to stream; use experts='per_expert' (or the default)"
        )
    unpack = experts == "per_expert" and layout == "packed"
    placement = placement or _placement(bridge, model, prefix, receiver)
    for group in bridge.under(prefix):
        if group.kind == "PackedExperts":
            yield from (_unpacked if unpack else _packed)(group, placement)
            continue
        full = {name: placement.fetch(name) for name in group.megatron}
        converted = group.to_hf(full, options) if placement.receives else {}
        del full
        while converted:  # hand each tensor over without keeping it
            name = next(iter(converted))
            yield name, converted.pop(name)


def hf_experts_layout(bridge: MappingTable) -> ExpertsLayout | None:
    """How the bridge's HF side stores routed experts (None without experts). A model whose
    decoder and MTP layouts differ counts as packed: some of its experts can be unpacked."""
    if any(group.kind == "PackedExperts" for group in bridge.groups):
        return "packed"
    if any(_PER_EXPERT_HF.search(hf) for group in bridge.groups for hf in group.hf):
        return "per_expert"
    return None


def buckets(stream: Iterable[Named], bucket_bytes: int) -> Iterator[list[Named]]:
    """The stream in lists whose tensors total at most `bucket_bytes` (a larger tensor comes
    alone), for an inference engine's weight-update call. Only the bucket being filled is held."""
    bucket: list[Named] = []
    size = 0
    for item in stream:
        nbytes = item[1].numel() * item[1].element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
        del item
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def hf_plan(
    bridge: MappingTable, placement: Placement, prefix: str
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every HF tensor `iter_hf` yields in the bridge's own layout, in its order, with its shape
    and dtype (a group's HF tensors have its Megatron tensors' dtype): a writer's plan."""
    return [
        (name, tuple(shape), placement.dtype_of(next(iter(group.megatron))))
        for group in bridge.under(prefix)
        for name, shape in group.hf.items()
    ]


def placement_of(
    bridge: MappingTable, model: Model, prefix: str, receiver: int | None = None
) -> Placement:
    """Where every tensor of `model` lives; a collective: every rank must call it."""
    return _placement(bridge, model, prefix, receiver)


def _placement(
    bridge: MappingTable,
    model: Model,
    prefix: str,
    receiver: int | None,
) -> Placement:
    params = global_parameters(model, prefix)
    unknown = sorted(set(params) - set(bridge.megatron_shapes))
    if unknown:
        raise ConversionError(
            f"{unknown[0]}: a parameter of the Megatron model that the bridge does not map"
        )
    first = next(iter(params.values()))[0]
    return Placement(bridge, params, receiver=receiver, device=first.device)


def _holdings(rank: int, params: dict[str, list[torch.nn.Parameter]], lm_prefix: str) -> Holdings:
    layers: set[int] = set()
    experts: set[int] = set()
    other: set[str] = set()
    counts: dict[str, int] = {}
    for name, copies in params.items():
        layer, expert = _layer_and_expert(name, lm_prefix)
        if layer is None:
            other.add(name)
        else:
            layers.add(layer)
            if expert is not None:
                experts.add(expert)
        dtype = str(copies[0].dtype).removeprefix("torch.")
        counts[dtype] = counts.get(dtype, 0) + 1
    dtype = max(counts, key=counts.__getitem__) if counts else "float32"
    exceptions = {
        n: str(c[0].dtype).removeprefix("torch.")
        for n, c in params.items()
        if str(c[0].dtype).removeprefix("torch.") != dtype
    }
    tp_ranks, etp_ranks = _group_ranks()
    return Holdings(
        rank=rank,
        layers=frozenset(layers),
        experts=(min(experts), max(experts)) if experts else None,
        other=frozenset(other),
        tp_ranks=tp_ranks,
        etp_ranks=etp_ranks,
        dtype=dtype,
        other_dtypes=exceptions,
    )


def _group_ranks() -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not dist.is_initialized():
        return (0,), (0,)
    from megatron.core import parallel_state as ps

    return (
        tuple(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())),
        tuple(dist.get_process_group_ranks(ps.get_expert_tensor_parallel_group())),
    )


def _layer_and_expert(name: str, lm_prefix: str) -> tuple[int | None, int | None]:
    """The global decoder layer of a name (None outside decoder layers) and its expert number."""
    bare = name[len(lm_prefix) :] if lm_prefix and name.startswith(lm_prefix) else name
    layer = names.layer_of(bare)
    return layer, (names.expert_of(bare) if layer is not None else None)


def _packed(group: Group, placement: Placement) -> Iterator[Named]:
    """A packed HF expert tensor, filled expert by expert as each arrives (the stack of the
    group's Megatron tensors, as the group's own conversion makes it, without holding both)."""
    ((hf_name, shape),) = group.hf.items()
    packed: Tensor | None = None
    for expert, name in enumerate(group.megatron):
        tensor = placement.fetch(name)
        if tensor is not None:
            if packed is None:
                packed = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            packed[expert].copy_(tensor)
        del tensor
    if packed is not None:
        yield hf_name, packed


def _unpacked(group: Group, placement: Placement) -> Iterator[Named]:
    """A packed group's experts one at a time, under their per-expert HF names: `gate_up_proj`
    rows split into `gate_proj` and `up_proj`, `down_proj` as it is."""
    ((packed, _shape),) = group.hf.items()
    for name in group.megatron:
        tensor = placement.fetch(name)
        if tensor is None:
            continue
        expert = names.expert_of(name)
        assert expert is not None, name
        hf_names = names.per_expert_hf(packed, expert)
        parts = tensor.chunk(len(hf_names), dim=0)
        del tensor
        yield from zip(hf_names, parts)
