"""BridgeBase: what every generated bridge is. The generated module supplies literal data (the
mapping table, the megatron-core config, GPTModel's arguments); this class supplies behaviour.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import Any, ClassVar

from codegen.runtime.mappings import Group, MappingBase


class BridgeBase:
    """Conversion between one model's HF checkpoint and megatron-core, driven by its mapping table."""

    model_id: ClassVar[str]
    hf_architecture: ClassVar[str]
    spec_sha256: ClassVar[str]
    mappings: ClassVar[tuple[MappingBase, ...]]
    gpt_model_args: ClassVar[dict[str, Any]]
    megatron_prefix: ClassVar[str]
    quantization: ClassVar[dict[str, Any] | None]

    def transformer_config(self, **overrides: Any) -> Any:
        raise NotImplementedError

    @cached_property
    def groups(self) -> tuple[Group, ...]:
        """Every concrete conversion group, in table order; each name appears in exactly one."""
        groups = tuple(g for m in self.mappings for g in m.groups())
        for side in ("hf", "megatron"):
            counts = Counter(name for g in groups for name in getattr(g, side))
            repeated = sorted(n for n, c in counts.items() if c > 1)
            if repeated:
                raise ValueError(f"{self.model_id}: {side} tensor {repeated[0]} is mapped more than once")
        return groups

    @cached_property
    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor of the checkpoint and its shape."""
        return {name: shape for g in self.groups for name, shape in g.hf.items()}

    @cached_property
    def megatron_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Megatron tensor (global, unsharded names) and its shape."""
        return {name: shape for g in self.groups for name, shape in g.megatron.items()}

    @property
    def hf_keys(self) -> frozenset[str]:
        return frozenset(self.hf_shapes)

    @property
    def megatron_keys(self) -> frozenset[str]:
        return frozenset(self.megatron_shapes)
