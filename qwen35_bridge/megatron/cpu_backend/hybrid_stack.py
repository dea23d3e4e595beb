"""megatron-core's HybridModel stack spec with the CPU layers in Transformer Engine's places.

`megatron.core.models.hybrid.hybrid_layer_specs.hybrid_stack_spec` is built when that module is
imported, from the TE classes it imports by name (stand-ins that cannot be built without TE), and
its MoE submodule from `get_moe_module_spec(use_te=True)`, which without TE falls back to another
expert implementation. The CPU spec is that same object with each of those TE names replaced by
the CPU layer that stands for it, and the MoE submodule derived as megatron-core derives it, from
the CPU spec provider: the layer classes, their submodules and their wiring stay megatron-core's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.spec_utils import ModuleSpec

from qwen35_bridge.megatron.cpu_backend.attention import CPUDotProductAttention
from qwen35_bridge.megatron.cpu_backend.linear import (
    CPUColumnParallelLinear,
    CPULayerNormColumnParallelLinear,
    CPULinear,
    CPURowParallelLinear,
)
from qwen35_bridge.megatron.cpu_backend.norm import CPUNorm
from qwen35_bridge.megatron.cpu_backend.provider import CPUSpecProvider

HYBRID_SPECS = "megatron.core.models.hybrid.hybrid_layer_specs"
#: The TE names `hybrid_layer_specs` imports, and the CPU layer standing for each.
STAND_INS: dict[str, type] = {
    "TEColumnParallelLinear": CPUColumnParallelLinear,
    "TEDotProductAttention": CPUDotProductAttention,
    "TELayerNormColumnParallelLinear": CPULayerNormColumnParallelLinear,
    "TELinear": CPULinear,
    "TENorm": CPUNorm,
    "TERowParallelLinear": CPURowParallelLinear,
}


def cpu_hybrid_stack_spec(num_experts: int | None) -> ModuleSpec:
    """`hybrid_stack_spec` for the CPU backend (for a model with `num_experts` routed experts)."""
    import importlib

    specs = importlib.import_module(HYBRID_SPECS)
    replaced = {id(getattr(specs, name)): layer for name, layer in STAND_INS.items()}
    spec = _replaced(specs.hybrid_stack_spec, replaced)
    if num_experts:
        moe_layer = spec.submodules.moe_layer
        mlp = get_moe_module_spec_for_backend(
            CPUSpecProvider(), num_experts=num_experts, moe_grouped_gemm=True
        )
        moe_layer = dataclasses.replace(
            moe_layer, submodules=dataclasses.replace(moe_layer.submodules, mlp=mlp)
        )
        spec = dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, moe_layer=moe_layer)
        )
    return spec


def _replaced(value: Any, replaced: dict[int, type]) -> Any:
    """A copy of a spec tree (ModuleSpecs, submodule dataclasses, partials, lists) with every
    object whose id is in `replaced` swapped for its replacement; anything else is kept as is."""
    if id(value) in replaced:
        return replaced[id(value)]
    if isinstance(value, ModuleSpec):
        return dataclasses.replace(
            value,
            module=_replaced(value.module, replaced),
            params=dict(value.params),
            submodules=_replaced(value.submodules, replaced),
        )
    if isinstance(value, functools.partial):
        return functools.partial(
            _replaced(value.func, replaced),
            *(_replaced(a, replaced) for a in value.args),
            **{k: _replaced(v, replaced) for k, v in value.keywords.items()},
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _replaced(getattr(value, f.name), replaced)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **fields)
    if isinstance(value, list):
        return [_replaced(v, replaced) for v in value]
    return value
