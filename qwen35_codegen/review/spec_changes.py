"""What changed between two specs, in the words a reviewer checks against the configs: fields with
their old and new values, layers whose kind changed, and layout changes, each on one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen35_codegen.rendering import describe
from qwen35_codegen.review.key_families import format_ranges
from qwen35_codegen.spec.model_spec import ModelSpec

LAYOUT_FIELDS = (
    "hf_prefix",
    "experts_layout",
    "mtp_experts_layout",
    "tie_word_embeddings",
    "quantization",
)
SCHEDULE_FIELDS = ("layer_types", "mlp_types")
KIND_NAMES = describe.MIXER_NAMES | {"dense": "dense MLP", "moe": "MoE"}


@dataclass(frozen=True)
class SpecChanges:
    fields: list[str]
    layers: list[str]
    layouts: list[str]

    def __bool__(self) -> bool:
        return bool(self.fields or self.layers or self.layouts)


def spec_changes(old: ModelSpec, new: ModelSpec) -> SpecChanges:
    a, b = old.to_dict(), new.to_dict()
    skipped = {"notes", *LAYOUT_FIELDS, *SCHEDULE_FIELDS}
    fields = _value_changes(
        {k: v for k, v in a.items() if k not in skipped},
        {k: v for k, v in b.items() if k not in skipped},
    )
    layouts = _value_changes({k: a[k] for k in LAYOUT_FIELDS}, {k: b[k] for k in LAYOUT_FIELDS})
    return SpecChanges(fields, _layer_changes(old, new), layouts)


def _value_changes(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """`name: old -> new` for each differing value; nested specs compared field by field."""
    lines = []
    for key in sorted(
        a, key=lambda k: isinstance(a[k], dict) or isinstance(b[k], dict)
    ):  # scalars first
        x, y = a[key], b[key]
        if isinstance(x, dict) and isinstance(y, dict):
            lines += _value_changes(x, y, f"{prefix}{key}.")
        elif x != y:
            lines.append(f"{prefix}{key}: {_show(x)} -> {_show(y)}")
    return lines


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(_show, value)) + ")"
    return str(value)


def _layer_changes(old: ModelSpec, new: ModelSpec) -> list[str]:
    """With the same number of layers, which layers changed kind; otherwise the two schedules."""
    if old.num_layers != new.num_layers:
        lines = [f"schedule: {describe.schedule(old)} -> {describe.schedule(new)}"]
        if old.mlp_types != new.mlp_types:
            lines.append(f"MLP: {_kind_counts(old.mlp_types)} -> {_kind_counts(new.mlp_types)}")
        return lines
    lines = []
    for field in SCHEDULE_FIELDS:
        moved: dict[tuple[str, str], list[int]] = {}
        for i, (x, y) in enumerate(zip(getattr(old, field), getattr(new, field))):
            if x != y:
                moved.setdefault((x, y), []).append(i)
        for (x, y), layers in moved.items():
            plural = "s" if len(layers) > 1 else ""
            lines.append(
                f"layer{plural} {format_ranges(layers)}: {KIND_NAMES[x]} -> {KIND_NAMES[y]}"
            )
    return lines


def _kind_counts(kinds: tuple[str, ...]) -> str:
    return " + ".join(f"{kinds.count(k)} x {KIND_NAMES[k]}" for k in dict.fromkeys(kinds))
