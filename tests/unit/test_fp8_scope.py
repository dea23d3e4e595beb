"""Which modules an FP8 release leaves unquantised: the runtime reads `modules_to_not_convert`
exactly as transformers does (its own function is the reference here)."""

from __future__ import annotations

import pytest
from transformers.quantizers.quantizers_utils import should_convert_module

from qwen35_bridge.formats.fp8 import not_converted

MODULES = [
    "lm_head",
    "model.layers.1.mlp.gate",
    "model.layers.1.mlp.gate_proj",
    "model.layers.11.mlp.gate",
    "model.layers.3.self_attn.q_proj",
    "model.layers.3.linear_attn.in_proj_qkvz",
    "model.layers.3.mlp.shared_expert.up_proj",
    "model.layers.3.mlp.shared_expert_gate",
    "model.layers.3.mlp.experts.7.down_proj",
    "mtp.layers.0.self_attn.o_proj",
    "mtp.fc",
]
PATTERNS = [
    ["lm_head"],
    ["model.layers.1"],
    ["mlp.gate"],
    ["model.layers.*.self_attn"],
    [r"model\.layers\.\d+\.(self_attn|linear_attn)", "mtp"],
    [r"model\.layers\.\d+\.mlp\.shared_expert"],
    ["model.layers.1.mlp.gate", "mtp.fc"],
    [],
]


@pytest.mark.parametrize("patterns", PATTERNS, ids=lambda p: ",".join(p) or "none")
def test_the_runtime_excludes_what_transformers_excludes(patterns: list[str]) -> None:
    for module in MODULES:
        expected = not should_convert_module(module, patterns)
        assert not_converted(f"{module}.weight", patterns) == expected, (module, patterns)


def test_the_rule_is_not_a_plain_prefix() -> None:
    """The cases a prefix test gets wrong, either way."""
    assert not not_converted("model.layers.11.mlp.gate.weight", ["model.layers.1"])
    assert not not_converted("model.layers.1.mlp.gate_proj.weight", ["mlp.gate"])
    assert not_converted("model.layers.4.self_attn.q_proj.weight", ["model.layers.*.self_attn"])
