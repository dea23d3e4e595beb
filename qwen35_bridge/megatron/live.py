"""Load HF weights into a live, possibly TP/PP/EP-sharded megatron-core model (`stream` exports).

A rank's parameters are named here by their global names (the names of the bridge's table): the
decoder layer's global number instead of its index in this pipeline stage, the global expert index
instead of the local one, and the language-model prefix of VL checkpoints. Each rank then takes
from every group exactly the slices it holds, with the group's tensor-parallel split rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping import names
from qwen35_bridge.mapping.kinds import ConvertOptions

if TYPE_CHECKING:
    from qwen35_bridge.mapping.table import MappingTable


Model = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def model_chunks(model: Model) -> list[torch.nn.Module]:
    """The model chunks training code holds, unwrapped: a model or its virtual-pipeline chunks,
    each possibly inside megatron-core's DDP and Float16Module."""
    from megatron.core.utils import unwrap_model

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    return list(unwrap_model(chunks))


def global_parameters(model: Model, prefix: str) -> dict[str, list[torch.nn.Parameter]]:
    """This rank's parameters, of every chunk, under their global names (no `_extra_state`). A
    name holds several parameters when a pipeline stage keeps a copy of the tied embedding for
    its output layer."""
    params: dict[str, list[torch.nn.Parameter]] = {}
    for chunk in model_chunks(model):
        for name, copies in _chunk_parameters(chunk, prefix).items():
            params.setdefault(name, []).extend(copies)
    return params


def _chunk_parameters(model: torch.nn.Module, prefix: str) -> dict[str, list[torch.nn.Parameter]]:
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
    model: Model,
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
    bridge: MappingTable, model: Model, read: Callable[[str], Tensor], *, prefix: str
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


def _copy_into(params: list[torch.nn.Parameter], piece: Tensor, name: str) -> None:
    for param in params:
        if tuple(piece.shape) != tuple(param.shape):
            raise ConversionError(
                f"{name}: this rank's slice is {list(piece.shape)} but the model's parameter is {list(param.shape)}"
            )
        param.copy_(piece)
