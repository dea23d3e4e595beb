"""On-disk layouts of HF checkpoints: routed-expert storage and key prefixes.

transformers 5.24 keeps routed experts packed in memory (`mlp.experts.gate_up_proj [E, 2I, H]`,
gate rows then up rows; `mlp.experts.down_proj [E, H, I]`), and `save_pretrained` may write either
layout depending on how the model was made. Test checkpoints must be in an exactly known layout,
so the conversion is done here, explicitly, in both directions.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from qwen35_bridge.mapping import names

ExpertsLayout = Literal["packed", "per_expert"]
EXPERTS_LAYOUTS: tuple[str, ...] = ("packed", "per_expert")

_PACKED = names.PACKED_EXPERTS
_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


def check_layout(layout: str) -> None:
    """Reject anything but the two layouts that occur in published checkpoints."""
    if layout not in EXPERTS_LAYOUTS:
        raise ValueError(f"experts layout {layout!r}: expected one of {EXPERTS_LAYOUTS}")


def experts_layout_of(state: dict[str, torch.Tensor]) -> ExpertsLayout | None:
    """The routed-expert layout of a state dict: "packed", "per_expert", or None without experts."""
    packed = any(_PACKED.match(k) for k in state)
    per_expert = any(_PER_EXPERT.match(k) for k in state)
    if packed and per_expert:
        raise ValueError("state dict mixes packed and per-expert routed experts")
    return "packed" if packed else "per_expert" if per_expert else None


def unpack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed -> per expert: `gate_up_proj[e]` rows `[:I]` gate, `[I:]` up; `down_proj[e]` as is.

    Other keys pass through in order; each packed tensor is replaced in place by its experts.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PACKED.match(key)
        if not m:
            out[key] = value
            continue
        prefix = m["prefix"]
        if m["proj"] == "gate_up_proj":
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = value[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = value[e, inter:].clone()
        else:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].clone()
    return out


def pack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per expert -> packed: `gate_up_proj = stack(cat([gate_e, up_e]))`, `down_proj = stack(down_e)`.

    Expert indices must be 0..E-1 with no gap; the packed tensors take the place of the first
    per-expert key of their prefix.
    """
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _PER_EXPERT.match(key)
        if not m:
            out[key] = value
            continue
        prefix = m["prefix"]
        if prefix not in groups:
            groups[prefix] = {"gate_proj": {}, "up_proj": {}, "down_proj": {}}
            out[f"{prefix}.gate_up_proj"] = torch.empty(0)  # placeholder keeps the position
            out[f"{prefix}.down_proj"] = torch.empty(0)
        groups[prefix][m["proj"]][int(m["e"])] = value
    for prefix, projs in groups.items():
        gate, up, down = (
            _ordered(projs[p], f"{prefix}.*.{p}") for p in ("gate_proj", "up_proj", "down_proj")
        )
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(gate, up, strict=True)]
        )
        if len(down) != len(gate):
            raise ValueError(f"{prefix}: {len(gate)} gate/up experts but {len(down)} down experts")
        out[f"{prefix}.down_proj"] = torch.stack(down)
    return out


def to_layout(state: dict[str, torch.Tensor], layout: ExpertsLayout) -> dict[str, torch.Tensor]:
    """Convert routed experts (in whatever layout they are) to `layout`."""
    check_layout(layout)
    return pack_experts(state) if layout == "packed" else unpack_experts(pack_experts(state))


def _ordered(tensors: dict[int, torch.Tensor], what: str) -> list[torch.Tensor]:
    if sorted(tensors) != list(range(len(tensors))):
        raise ValueError(f"{what}: expert indices {sorted(tensors)} are not 0..E-1")
    return [tensors[e] for e in range(len(tensors))]


def replace_prefix(state: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Rename keys starting with `old + "."` to start with `new + "."` (others pass through)."""
    if old == new:
        return dict(state)
    return {(new + k[len(old) :] if k.startswith(old + ".") else k): v for k, v in state.items()}
