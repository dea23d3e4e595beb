"""How Megatron parameter names carry numbers, defined once: a decoder layer's index
(`decoder.layers.{i}.`) and a grouped expert's index, appended to its weight (`linear_fc1.weight7`).

A pipeline stage numbers its layers from 0 and an expert-parallel rank its experts from 0; the
bridge's table uses global numbers. These helpers move a name between the two.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: `decoder.layers.{i}.` at the start of a (prefix-free) Megatron name.
DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
#: The expert number Megatron appends to a grouped expert's weight or bias.
GROUPED_EXPERT = re.compile(r"(\.mlp\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")
#: Name segments to which Megatron appends an expert number (`weight7`).
EXPERT_SUFFIXED = ("weight", "bias")


def is_expert(name: str) -> bool:
    """Whether a Megatron tensor belongs to a routed expert (it is sharded over expert groups)."""
    return ".mlp.experts." in name


def layer_of(name: str) -> int | None:
    """The decoder layer number in a Megatron name, if it has one."""
    match = DECODER_LAYER.match(name)
    return int(match.group(1)) if match else None


def renumber_layer(name: str, number: Callable[[int], int]) -> str:
    """`name` with its decoder layer number `i` replaced by `number(i)`."""
    return DECODER_LAYER.sub(lambda m: f"decoder.layers.{number(int(m.group(1)))}.", name)


def expert_of(name: str) -> int | None:
    """The grouped expert number at the end of a Megatron name, if it has one."""
    match = GROUPED_EXPERT.search(name)
    return int(match.group(2)) if match else None


def renumber_expert(name: str, offset: int) -> str:
    """`name` with its grouped expert number moved by `offset` (local <-> global)."""
    return GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name)


#: A packed HF expert tensor (`...mlp.experts.gate_up_proj`, `...mlp.experts.down_proj`).
PACKED_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
#: The per-expert HF tensors one packed tensor holds for each expert, in its row order.
PER_EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def per_expert_hf(packed: str, expert: int) -> tuple[str, ...]:
    """The per-expert HF names of `expert` within a packed tensor: `gate_up_proj` holds each
    expert's `gate_proj` rows then its `up_proj` rows, `down_proj` its `down_proj`."""
    match = PACKED_EXPERTS.match(packed)
    if match is None:
        raise ValueError(f"{packed}: not a packed expert tensor")
    projections = PER_EXPERT_PROJECTIONS[match["proj"]]
    return tuple(f"{match['prefix']}.{expert}.{p}.weight" for p in projections)
