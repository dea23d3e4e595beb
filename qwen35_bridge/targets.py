"""The megatron-core model classes a bridge can target, and HybridModel's layer pattern, defined once.

`gpt`: megatron-core's GPTModel, one decoder layer per HF layer (mixer and MLP together).
`hybrid`: megatron-core's HybridModel, which 0.19 recommends over GPTModel: HF (logical) layer `i`
is two physical decoder layers, `2i` (the mixer, GDN or gated attention, with its input norm) and
`2i + 1` (the dense MLP or MoE, with its norm), described by a layer pattern string; each MTP layer
is a small stack of the same two layers. The same spec and the same transforms serve both; only the
Megatron names differ (docs/reference.md section 12). Pure Python: reading a table needs no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TARGETS: tuple[str, ...] = ("gpt", "hybrid")
DEFAULT_TARGET = "gpt"
#: The megatron-core class each target builds.
MODEL_CLASSES = {"gpt": "GPTModel", "hybrid": "HybridModel"}

# HybridModel's layer symbols (megatron.core.models.hybrid.hybrid_layer_allocation.Symbols in
# 0.19.2; a test holds them together).
GDN = "G"
ATTENTION = "*"
MLP = "-"
MOE = "E"
MTP_SEPARATOR = "/"
PIPE = "|"
#: Symbol of each mixer kind (`ModelSpec.layer_types`) and MLP kind (`ModelSpec.mlp_types`).
MIXER_SYMBOLS = {"gdn": GDN, "attention": ATTENTION}
MLP_SYMBOLS = {"dense": MLP, "moe": MOE}
_LOGICAL_LAYER = re.compile(f"[{re.escape(GDN + ATTENTION)}][{re.escape(MLP + MOE)}]")


def require_target(target: str) -> str:
    """`target` if it is one this project builds, else a ValueError naming it."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return target


def mixer_layer(logical: int) -> int:
    """HybridModel's layer number of logical layer `logical`'s mixer (and input norm)."""
    return 2 * logical


def mlp_layer(logical: int) -> int:
    """HybridModel's layer number of logical layer `logical`'s MLP or MoE (and its norm)."""
    return 2 * logical + 1


def hybrid_layer_pattern(
    layer_types: Sequence[str],
    mlp_types: Sequence[str],
    mtp_layers: int = 0,
    mtp_mlp_type: str | None = None,
) -> str:
    """The pattern of a model: a mixer symbol then an MLP symbol per logical layer, and, after one
    `/` per MTP layer, the MTP layer's own pair (gated attention and its MLP kind)."""
    if len(layer_types) != len(mlp_types):
        raise ValueError(f"{len(layer_types)} layer types but {len(mlp_types)} MLP types")
    main = "".join(MIXER_SYMBOLS[m] + MLP_SYMBOLS[f] for m, f in zip(layer_types, mlp_types))
    mtp = ATTENTION + MLP_SYMBOLS[mtp_mlp_type or "dense"]
    return main + (MTP_SEPARATOR + mtp) * mtp_layers


def logical_layers(pattern: str) -> list[str]:
    """The main pattern (before the first `/`, no `|`) cut into its logical layers, two symbols
    each; a pattern that is not a sequence of mixer-MLP pairs is an error naming it."""
    main = pattern.split(MTP_SEPARATOR)[0]
    pairs = _LOGICAL_LAYER.findall(main)
    if "".join(pairs) != main:
        raise ValueError(
            f"hybrid layer pattern {pattern!r}: the main part must be mixer-MLP pairs "
            f"({GDN} or {ATTENTION}, then {MLP} or {MOE}), without {PIPE}"
        )
    return pairs


def pipeline_pattern(pattern: str, segments: int) -> str:
    """`pattern` with a `|` between its `segments` pipeline segments (pipeline stages times virtual
    stages), each holding the same number of whole logical layers, in order: the layers GPTModel
    would put on each stage. HybridModel gives segment `vp * pp_size + pp_rank` to each chunk."""
    pairs = logical_layers(pattern)
    if segments < 1 or len(pairs) % segments:
        raise ValueError(
            f"{len(pairs)} layers cannot be cut into {segments} pipeline segments of whole layers"
        )
    size = len(pairs) // segments
    main = PIPE.join("".join(pairs[s * size : (s + 1) * size]) for s in range(segments))
    mtp = pattern[len("".join(pairs)) :]
    return main + mtp
