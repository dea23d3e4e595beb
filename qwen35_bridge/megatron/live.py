"""Load HF weights into a live, possibly TP/PP/EP-sharded megatron-core model, and export them back.

A rank's parameters are named here by their global names (the names of the bridge's table): the
decoder layer's global number instead of its index in this pipeline stage, the global expert index
instead of the local one, and the language-model prefix of VL checkpoints. Each rank then takes
from every group exactly the slices it holds, with the group's tensor-parallel split rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping import names
from qwen35_bridge.mapping.kinds import ConvertOptions

if TYPE_CHECKING:
    from qwen35_bridge.mapping.table import MappingTable


def global_parameters(model: torch.nn.Module, prefix: str) -> dict[str, list[torch.nn.Parameter]]:
    """This rank's parameters under their global names (no `_extra_state`). A name holds several
    parameters when a pipeline stage keeps a copy of the tied embedding for its output layer."""
    from megatron.core import parallel_state

    layer_numbers = {}
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(decoder.layers)}
    local_experts = (
        model.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
        if model.config.num_moe_experts
        else 0
    )
    expert_offset = parallel_state.get_expert_model_parallel_rank() * local_experts
    tied_copy = getattr(model, "share_embeddings_and_output_weights", False) and not getattr(
        model, "pre_process", True
    )

    params: dict[str, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        name = names.renumber_layer(name, layer_numbers.__getitem__)
        name = names.renumber_expert(name, expert_offset)
        if tied_copy and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
        params.setdefault(prefix + name, []).append(param)
    return params


def _tp_rank_and_size(name: str) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if names.is_expert(name):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load(
    bridge: MappingTable,
    model: torch.nn.Module,
    read: Callable[[str], Tensor],
    *,
    prefix: str,
    options: ConvertOptions = ConvertOptions(),
) -> None:
    """Fill every parameter of `model` from HF tensors given by `read(name)`; each exactly once."""
    params = global_parameters(model, prefix)
    unknown = sorted(set(params) - set(bridge.megatron_shapes))
    if unknown:
        raise ConversionError(
            f"{unknown[0]}: a parameter of the Megatron model that the bridge does not map"
        )
    assigned: set[str] = set()
    for group in bridge.groups:
        wanted = [name for name in group.megatron if name in params]
        if not wanted:
            continue
        converted = group.to_megatron({name: read(name) for name in group.hf}, options)
        for name in wanted:
            rank, size = _tp_rank_and_size(name)
            _copy_into(params[name], group.split.shard(converted[name], rank, size), name)
            assigned.add(name)
    missing = sorted(set(params) - assigned)
    if missing:
        raise ConversionError(f"{missing[0]}: not filled by the bridge")


@torch.no_grad()
def load_megatron(
    bridge: MappingTable, model: torch.nn.Module, read: Callable[[str], Tensor], *, prefix: str
) -> None:
    """Fill `model` from full Megatron tensors (global names) given by `read(name)`."""
    params = global_parameters(model, prefix)
    splits = bridge.splits
    for name, param in params.items():
        if name not in splits:
            raise ConversionError(
                f"{name}: a parameter of the Megatron model that the bridge does not map"
            )
        rank, size = _tp_rank_and_size(name)
        _copy_into(param, splits[name].shard(read(name), rank, size), name)


@torch.no_grad()
def export(bridge: MappingTable, model: torch.nn.Module, *, prefix: str) -> dict[str, Tensor]:
    """The full (unsharded) Megatron tensors of the whole model, on every rank, by global name."""
    params = global_parameters(model, prefix)
    splits = bridge.splits
    mine: dict[str, Tensor] = {}
    for name, copies in params.items():
        rank, size = _tp_rank_and_size(name)
        tensor = copies[0].detach()
        if size > 1 and splits[name].dim is not None:
            tensor = splits[name].merge(_gather(tensor, name))
        if rank == 0:
            mine[name] = tensor.clone()
    everything: dict[str, Tensor] = {}
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[dict[str, Tensor] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        for part in parts:
            everything.update(part or {})
    else:
        everything = mine
    expected = [name for name in bridge.megatron_shapes if name.startswith(prefix)]
    missing = [name for name in expected if name not in everything]
    if missing:
        raise ConversionError(f"{missing[0]}: no rank of the model holds this tensor")
    return {name: everything[name] for name in expected}


def _copy_into(params: list[torch.nn.Parameter], piece: Tensor, name: str) -> None:
    for param in params:
        if tuple(piece.shape) != tuple(param.shape):
            raise ConversionError(
                f"{name}: this rank's slice is {list(piece.shape)} but the model's parameter is {list(param.shape)}"
            )
        param.copy_(piece)


def _gather(tensor: Tensor, name: str) -> list[Tensor]:
    from megatron.core import parallel_state as ps

    group = (
        ps.get_expert_tensor_parallel_group()
        if names.is_expert(name)
        else ps.get_tensor_model_parallel_group()
    )
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def to_hf(
    bridge: MappingTable,
    megatron: Mapping[str, Tensor],
    *,
    prefix: str,
    options: ConvertOptions = ConvertOptions(),
) -> dict[str, Tensor]:
    """Convert full Megatron tensors to HF, group by group: every group under `prefix` (all of
    them, for the empty prefix), each of whose tensors `megatron` must hold."""
    out: dict[str, Tensor] = {}
    for group in bridge.under(prefix):
        missing = [name for name in group.megatron if name not in megatron]
        if missing:
            raise ConversionError(f"{missing[0]}: not among the model's tensors")
        out.update(group.to_hf({name: megatron[name] for name in group.megatron}, options))
    return out
