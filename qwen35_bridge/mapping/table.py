"""A mapping table expanded into its groups, with every tensor name of each side and its shape.

Everything that converts (on disk, or a live model) works on these groups, so a tensor the table
does not name cannot be converted, and a name the table gives twice is an error at once.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import ClassVar

from qwen35_bridge.mapping.kinds import Group, MappingBase
from qwen35_bridge.mapping.splits import Split

#: Megatron names of the vision tower start with this; the language model's take `megatron_prefix`.
VISION_PREFIX = "vision_model."

Shape = tuple[int, ...]


class MappingTable:
    """The expanded table of a bridge: a generated module supplies `mappings` and the names."""

    model_id: ClassVar[str]
    mappings: ClassVar[tuple[MappingBase, ...]]
    megatron_prefix: ClassVar[str]  # of language-model tensors (`language_model.` in VL models)

    @cached_property
    def groups(self) -> tuple[Group, ...]:
        """Every concrete conversion group, in table order; each name appears in exactly one."""
        groups = tuple(g for m in self.mappings for g in m.groups())
        for side in ("hf", "megatron"):
            counts = Counter(name for g in groups for name in getattr(g, side))
            repeated = sorted(n for n, c in counts.items() if c > 1)
            if repeated:
                raise ValueError(
                    f"{self.model_id}: {side} tensor {repeated[0]} is mapped more than once"
                )
        return groups

    @cached_property
    def hf_shapes(self) -> dict[str, Shape]:
        """Every HF tensor of the checkpoint and its shape."""
        return {name: shape for g in self.groups for name, shape in g.hf.items()}

    @cached_property
    def megatron_shapes(self) -> dict[str, Shape]:
        """Every Megatron tensor (global, unsharded names) and its shape."""
        return {name: shape for g in self.groups for name, shape in g.megatron.items()}

    @cached_property
    def splits(self) -> dict[str, Split]:
        """How each Megatron tensor is cut across tensor-parallel ranks."""
        return {name: g.split for g in self.groups for name in g.megatron}

    @cached_property
    def group_of(self) -> dict[str, Group]:
        """The group of each Megatron tensor name."""
        return {name: g for g in self.groups for name in g.megatron}

    @property
    def hf_keys(self) -> frozenset[str]:
        return frozenset(self.hf_shapes)

    @property
    def megatron_keys(self) -> frozenset[str]:
        return frozenset(self.megatron_shapes)

    @cached_property
    def is_vl(self) -> bool:
        """Whether the table maps a vision tower (a vision-language model)."""
        return any(name.startswith(VISION_PREFIX) for name in self.megatron_shapes)

    def under(self, prefix: str) -> tuple[Group, ...]:
        """The groups whose Megatron tensors all start with `prefix` (all, for "")."""
        return tuple(g for g in self.groups if all(name.startswith(prefix) for name in g.megatron))
