"""Parameter counts per component of a model, from its Megatron tensor names and shapes.

Megatron names say what a tensor belongs to (`self_attention.in_proj` is a GatedDeltaNet,
`mlp.experts` a routed expert), so the split needs no knowledge of the schedule. A name that fits
no component is an error: a count that silently leaves tensors out would mislead a reviewer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from qwen35_codegen.errors import CodegenError

Shape = tuple[int, ...]
_LAYER = r"decoder\.layers\.\d+\."
# First match wins; each layer's input norm is counted with its mixer, the MoE pre-MLP norm with the router.
COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("embedding", r"embedding\."),
        (
            "gdn_layers",
            _LAYER + r"self_attention\.(in_proj|conv1d|A_log|dt_bias|out_norm|out_proj)\b",
        ),
        (
            "attention_layers",
            _LAYER + r"self_attention\.(linear_qkv|q_layernorm|k_layernorm|linear_proj)\b",
        ),
        ("dense_mlp", _LAYER + r"mlp\.linear_fc[12]\."),
        ("moe_router", _LAYER + r"(pre_mlp_layernorm|mlp\.router)\."),
        ("routed_experts", _LAYER + r"mlp\.experts\."),
        ("shared_experts", _LAYER + r"mlp\.shared_experts\."),
        ("mtp", r"mtp\."),
        ("vision", r"vision_model\."),
        ("final_norm", r"decoder\.(final_layernorm|final_norm)\."),
        ("output_layer", r"output_layer\."),
    )
)
COMPONENT_NAMES = tuple(name for name, _ in COMPONENTS)


def component_of(megatron_name: str, prefix: str) -> str:
    """The component a Megatron tensor belongs to; `prefix` is the language model's (`language_model.`)."""
    name = megatron_name.removeprefix(prefix)
    for component, pattern in COMPONENTS:
        if pattern.match(name):
            return component
    raise CodegenError(
        f"Megatron tensor {megatron_name} belongs to no known component ({', '.join(COMPONENT_NAMES)})"
    )


def parameter_counts(megatron_shapes: Mapping[str, Shape], prefix: str) -> dict[str, int]:
    """Parameters per component (every component, zero where absent) and their total."""
    counts = dict.fromkeys(COMPONENT_NAMES, 0)
    for name, shape in megatron_shapes.items():
        counts[component_of(name, prefix)] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts
