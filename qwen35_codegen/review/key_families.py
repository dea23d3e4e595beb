"""Key families: thousands of concrete tensor names folded into a few readable patterns.

`model.language_model.layers.3.mlp.experts.7.gate_proj.weight` belongs to the family
`model.language_model.layers.{i}.mlp.experts.{e}.gate_proj.weight` with `i` and `e` in compact
ranges (`0-2,4-6`). The folding is derived from the names alone, so it says what a table maps,
not what its author meant it to map.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qwen35_bridge.mapping.names import EXPERT_SUFFIXED
from qwen35_codegen.errors import CodegenError

Shape = tuple[int, ...]
PLACEHOLDERS = (
    "i",
    "e",
)  # the first index in a name is the layer (or block), the second the expert
#: Name segments after which a number is part of the family's name, not an index: the inner layers
#: of a HybridModel MTP layer are fixed positions (0 its attention, 1 its MLP).
FIXED_POSITIONS = ("mtp_model_layer.layers",)


@dataclass(frozen=True)
class KeyFamily:
    """Tensors whose names differ only in their indices: the pattern, the indices each placeholder
    takes, how many tensors there are, and their common shape."""

    pattern: str
    ranges: tuple[tuple[int, ...], ...]
    count: int
    shape: Shape

    @property
    def placeholders(self) -> tuple[str, ...]:
        return PLACEHOLDERS[: len(self.ranges)]

    def keys(self) -> list[str]:
        """Every name of the family (the product of its ranges)."""
        return [
            self.pattern.format(**dict(zip(self.placeholders, combo)))
            for combo in itertools.product(*self.ranges)
        ]


def generalise(name: str) -> tuple[str, tuple[int, ...]]:
    """A tensor name's family pattern and its indices, in order of appearance: each numeric segment
    (`layers.3.`) and the expert number Megatron appends (`weight7`) becomes a placeholder."""
    segments = name.split(".")
    last = len(segments) - 1
    indices: list[int] = []
    for n, segment in enumerate(segments):
        if not segment[-1:].isdigit():
            continue
        stem = segment.rstrip("0123456789")
        if stem and not (n == last and stem in EXPERT_SUFFIXED):
            continue
        if ".".join(segments[max(0, n - 2) : n]) in FIXED_POSITIONS:
            continue
        if len(indices) == len(PLACEHOLDERS):
            raise CodegenError(
                f"tensor {name} has more than {len(PLACEHOLDERS)} indices; key families know {PLACEHOLDERS}"
            )
        indices.append(int(segment[len(stem) :]))
        segments[n] = stem + "{" + PLACEHOLDERS[len(indices) - 1] + "}"
    return ".".join(segments), tuple(indices)


def families_of(shapes: Mapping[str, Shape]) -> dict[str, KeyFamily]:
    """The families of `shapes` (name -> shape), in the order their first tensor appears."""
    members: dict[str, list[tuple[int, ...]]] = {}
    family_shapes: dict[str, set[Shape]] = {}
    for name, shape in shapes.items():
        pattern, indices = generalise(name)
        members.setdefault(pattern, []).append(indices)
        family_shapes.setdefault(pattern, set()).add(tuple(shape))
    families = {}
    for pattern, indices in members.items():
        if len(family_shapes[pattern]) > 1:
            raise CodegenError(
                f"key family {pattern} has tensors of different shapes: {sorted(family_shapes[pattern])}"
            )
        (shape,) = family_shapes[pattern]
        ranges = tuple(tuple(sorted(set(column))) for column in zip(*indices))
        families[pattern] = KeyFamily(pattern, ranges, len(indices), shape)
    return families


def format_ranges(values: Iterable[int]) -> str:
    """`0,1,2,4,5,6,9` -> `0-2,4-6,9`: exact, and short for the regular schedules of real models."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_ranges(text: str) -> tuple[int, ...]:
    """Inverse of `format_ranges`."""
    values: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise CodegenError(f"not an index range: {text!r} (expected e.g. 0-2,4-6,9)")
        values.extend(range(int(first), int(last or first) + 1))
    return tuple(values)
