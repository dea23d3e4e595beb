"""Shrink a real Qwen3.5-family `config.json` into a tiny one that keeps its architecture.

The tiny config keeps what decides the conversion (config form, layer schedule, head ratios, tied
embeddings, MTP layer count, MoE routing flags, partial rotary factor, mRoPE sections, norm eps)
and shrinks only the sizes, so a test on the tiny model exercises the same code paths as the real
model at a few hundred kilobytes of weights.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

from qwen35_bridge.families import (
    CONFIG_FORMS,
    config_form,
    text_config_of,
    text_model_type,
)

# Token-id keys that index the vocabulary: they must stay inside the tiny vocabulary.
TOKEN_ID_KEYS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


@dataclass(frozen=True)
class TinyDims:
    """Target sizes of a tiny model; the defaults keep every tensor small but not degenerate.

    The sizes are pairwise distinct where a mix-up would otherwise go unnoticed (expert vs shared
    expert size, dense MLP vs hidden), and head counts stay even so TP=2 splits are possible.
    """

    hidden_size: int = 64
    head_dim: int = 32
    num_key_value_heads: int = 2
    linear_num_key_heads: int = 2
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 48
    vocab_size: int = 256
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_num_heads: int = 2
    vision_patch_size: int = 8
    vision_num_position_embeddings: int = 64


def is_moe(config: dict[str, Any]) -> bool:
    """Whether the language model has routed experts (Qwen3.5-MoE, or Qwen3-Next with experts)."""
    text = text_config_of(config)
    return text_model_type(config) != "qwen3_5_text" and text.get("num_experts", 0) > 0


def tied_embeddings(config: dict[str, Any]) -> bool:
    """The governing tie flag: the top-level value (VL: transformers ignores the text one)."""
    return bool(config.get("tie_word_embeddings", False))


def layer_types(config: dict[str, Any]) -> list[str]:
    """Per-layer schedule of the language model, from `layer_types` or `full_attention_interval`."""
    return text_schedule(text_config_of(config))


def text_schedule(text: dict[str, Any]) -> list[str]:
    """Schedule of a flat text dict; the interval rule is transformers' and docs/reference.md section 1's."""
    if text.get("layer_types"):
        return list(text["layer_types"])
    interval = text["full_attention_interval"]
    return [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention"
        for i in range(text["num_hidden_layers"])
    ]


def moe_layers(config: dict[str, Any]) -> list[bool]:
    """Per-layer MLP kind (True = MoE), with Qwen3-Next's `mlp_only_layers`/`decoder_sparse_step`."""
    text = text_config_of(config)
    n = text["num_hidden_layers"]
    if not is_moe(config):
        return [False] * n
    if text_model_type(config) != "qwen3_next":
        return [True] * n
    dense = set(text.get("mlp_only_layers") or [])
    step = text.get("decoder_sparse_step", 1)
    return [i not in dense and (i + 1) % step == 0 for i in range(n)]


def schedule_period(types: list[str]) -> list[str]:
    """The shortest prefix whose repetition reproduces `types` (the whole list when aperiodic)."""
    for p in range(1, len(types) + 1):
        if all(types[i] == types[i % p] for i in range(len(types))):
            return types[:p]
    return types


def scale_mrope_section(section: list[int], half_rotary_dim: int) -> list[int]:
    """Scale mRoPE sections so they sum to the tiny rotary half-dim (largest-remainder rounding).

    HF's interleaved mRoPE indexes the `half_rotary_dim` frequencies: T takes every slot not taken
    by H (`1::3`, first `3*section[1]`) or W (`2::3`, first `3*section[2]`), so the sections must
    sum to `head_dim * partial_rotary_factor / 2`. Every section keeps at least one slot when the
    half-dim allows it, so no axis silently disappears.
    """
    total = sum(section)
    exact = [s * half_rotary_dim / total for s in section]
    scaled = [max(1 if half_rotary_dim >= len(section) else 0, math.floor(x)) for x in exact]
    order = sorted(range(len(section)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    k = 0
    while sum(scaled) < half_rotary_dim:
        scaled[order[k % len(order)]] += 1
        k += 1
    while sum(scaled) > half_rotary_dim:
        i = max(range(len(scaled)), key=lambda j: (scaled[j], -j))
        scaled[i] -= 1
    return scaled


def _partial_rotary_factor(text: dict[str, Any]) -> float:
    rope = text.get("rope_parameters") or {}
    return float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0)))


def _shrink_heads(text: dict[str, Any], dims: TinyDims) -> None:
    """Attention and GDN head counts: few heads, the source's q-per-kv and v-per-k ratios."""
    nh, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    if nh % nkv:
        raise ValueError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    tiny_nkv = min(nkv, dims.num_key_value_heads)
    text["num_key_value_heads"] = tiny_nkv
    text["num_attention_heads"] = tiny_nkv * (nh // nkv)
    text["head_dim"] = dims.head_dim
    nk, nv = text["linear_num_key_heads"], text["linear_num_value_heads"]
    if nv % nk:
        raise ValueError(
            f"linear_num_value_heads={nv} is not a multiple of linear_num_key_heads={nk}"
        )
    tiny_nk = min(nk, dims.linear_num_key_heads)
    text["linear_num_key_heads"] = tiny_nk
    text["linear_num_value_heads"] = tiny_nk * (nv // nk)
    text["linear_key_head_dim"] = dims.linear_key_head_dim
    text["linear_value_head_dim"] = dims.linear_value_head_dim


def _shrink_schedule(text: dict[str, Any], periods: int) -> list[str]:
    """Repeat one period of the source schedule `periods` times; keep the source's keys."""
    source = text_schedule(text)
    if "layer_types" in text:
        period = schedule_period(source)
    else:
        period = source[: text["full_attention_interval"]]
    types = period * periods
    text["num_hidden_layers"] = len(types)
    if "layer_types" in text:
        text["layer_types"] = types
    return types


def _shrink_mlp_only_layers(text: dict[str, Any], n_layers: int) -> None:
    """Qwen3-Next dense-layer list: keep indices that still exist; keep a dense layer if any was."""
    source = text.get("mlp_only_layers")
    if not source:
        return
    kept = [i for i in source if i < n_layers]
    text["mlp_only_layers"] = kept or [0]


def _shrink_rope(text: dict[str, Any]) -> None:
    """mRoPE sections follow the tiny rotary half-dim; theta and partial factor stay."""
    rope = text.get("rope_parameters")
    if not rope or "mrope_section" not in rope:
        return
    rotary_dim = int(text["head_dim"] * _partial_rotary_factor(text))
    rope["mrope_section"] = scale_mrope_section(list(rope["mrope_section"]), rotary_dim // 2)


def _shrink_moe(text: dict[str, Any], dims: TinyDims, experts: int, top_k: int) -> None:
    if "num_experts" in text and text["num_experts"] > 0:
        text["num_experts"] = experts
        text["num_experts_per_tok"] = min(top_k, experts)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if key in text:
            text[key] = getattr(dims, key)


def _shrink_text(
    text: dict[str, Any], dims: TinyDims, periods: int, experts: int, top_k: int
) -> list[str]:
    types = _shrink_schedule(text, periods)
    text["hidden_size"] = dims.hidden_size
    text["vocab_size"] = dims.vocab_size
    if "intermediate_size" in text:
        text["intermediate_size"] = dims.intermediate_size
    _shrink_heads(text, dims)
    _shrink_moe(text, dims, experts, top_k)
    _shrink_mlp_only_layers(text, len(types))
    _shrink_rope(text)
    if "mtp_num_hidden_layers" in text:
        text["mtp_num_hidden_layers"] = 1
    return types


def _shrink_vision(vision: dict[str, Any], dims: TinyDims, text_hidden: int) -> None:
    vision["depth"] = dims.vision_depth
    vision["hidden_size"] = dims.vision_hidden_size
    vision["intermediate_size"] = dims.vision_intermediate_size
    vision["num_heads"] = dims.vision_num_heads
    vision["patch_size"] = dims.vision_patch_size
    vision["num_position_embeddings"] = dims.vision_num_position_embeddings
    vision["out_hidden_size"] = text_hidden
    vision["spatial_merge_size"] = 2
    vision["temporal_patch_size"] = 2
    if vision.get("deepstack_visual_indexes"):
        vision["deepstack_visual_indexes"] = [
            i for i in vision["deepstack_visual_indexes"] if i < dims.vision_depth
        ]


def _remap_token_ids(dicts: list[dict[str, Any]], vocab_size: int) -> None:
    """Move token ids that fall outside the tiny vocabulary to its top, keeping equal ids equal."""
    ids = sorted(
        {v for d in dicts for k in TOKEN_ID_KEYS for v in _as_ids(d.get(k)) if v >= vocab_size}
    )
    new = {old: vocab_size - 1 - i for i, old in enumerate(ids)}
    for d in dicts:
        for key in TOKEN_ID_KEYS:
            value = d.get(key)
            if isinstance(value, list):
                d[key] = [new.get(v, v) for v in value]
            elif isinstance(value, int):
                d[key] = new.get(value, value)


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    return list(value) if isinstance(value, list) else [value] if isinstance(value, int) else []


def _shrink_quantization(
    config: dict[str, Any], source_types: list[str], tiny_types: list[str], block: int
) -> None:
    """FP8 block config for the tiny model: smaller blocks, per-layer exclusions re-derived.

    A per-layer exclusion (`model.layers.{i}.<suffix>`) is kept as "layers of kind
    layer_types[i] exclude <suffix>", then re-emitted for the tiny layers of that kind.
    """
    quant = config.get("quantization_config")
    if not quant:
        return
    quant["weight_block_size"] = [block, block]
    if "modules_to_not_convert" in quant:
        quant["modules_to_not_convert"] = remap_layer_modules(
            quant["modules_to_not_convert"], source_types, tiny_types
        )


def remap_layer_modules(
    names: list[str], source_types: list[str], tiny_types: list[str]
) -> list[str]:
    """Re-derive per-layer module names (`<prefix>layers.{i}.<suffix>`) for another schedule."""
    pattern = re.compile(r"^(model\.(?:language_model\.)?layers)\.(\d+)\.(.+)$")
    by_kind: dict[str, list[tuple[str, str]]] = {}
    head: list[str] = []  # names before the first per-layer one (e.g. lm_head)
    tail: list[str] = []  # names after it (e.g. mtp.*), MTP layers are not remapped
    for name in names:
        m = pattern.match(name)
        if m:
            entry = (m.group(1), m.group(3))
            kinds = by_kind.setdefault(source_types[int(m.group(2))], [])
            if entry not in kinds:
                kinds.append(entry)
        else:
            (tail if by_kind else head).append(name)
    layers = [
        f"{prefix}.{i}.{suffix}"
        for i, kind in enumerate(tiny_types)
        for prefix, suffix in by_kind.get(kind, [])
    ]
    return head + layers + tail


def tiny_config(
    config: dict[str, Any],
    *,
    periods: int = 2,
    experts: int = 4,
    top_k: int = 2,
    dims: TinyDims = TinyDims(),
    fp8_block: int = 16,
    tie: bool | None = None,
    text_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A tiny config derived from any raw Qwen3.5-family `config.json` dict (the input is not changed).

    Keeps the form (VL stays VL with the same architectures; flat stays flat), one period of the
    layer schedule repeated `periods` times (from `layer_types` or `full_attention_interval`,
    whichever the source has), q-per-kv and GDN v-per-k head ratios, the tie flag (unless `tie`
    overrides it, then top level and `text_config` both change), `mtp_num_hidden_layers` (as 1),
    Qwen3-Next routing keys, `partial_rotary_factor`, `rms_norm_eps`, rope theta, and every key
    whose value need not shrink. `mrope_section` is rescaled (see `scale_mrope_section`), token ids
    move inside the tiny vocabulary, FP8 blocks become `fp8_block` wide. `text_overrides` is applied
    last to the language-model fields, for variants no release has (e.g. `norm_topk_prob: false`).
    """
    out = copy.deepcopy(config)
    form = config_form(out)
    text = out["text_config"] if form.vision else out
    source_types = layer_types(config)
    tiny_types = _shrink_text(text, dims, periods, experts, top_k)
    if form.vision:
        _shrink_vision(out["vision_config"], dims, text["hidden_size"])
    if tie is not None:
        out["tie_word_embeddings"] = tie
        if form.vision and "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = tie
    _remap_token_ids([out, text] if form.vision else [out], dims.vocab_size)
    _shrink_quantization(out, source_types, tiny_types, fp8_block)
    text.update(copy.deepcopy(text_overrides or {}))
    return out


def text_only_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat text-only config (`Qwen3_5ForCausalLM` / `...MoeForCausalLM`) of a VL config.

    Flat configs are returned as a copy. The top-level tie flag governs in VL, so it is carried.
    """
    form = config_form(config)
    if not form.vision:
        return copy.deepcopy(config)
    text = copy.deepcopy(config["text_config"])
    text.setdefault("model_type", form.family.text_model_type)
    text["architectures"] = [CONFIG_FORMS[text["model_type"]].architecture]
    text["tie_word_embeddings"] = tied_embeddings(config)
    for key in ("transformers_version", "quantization_config"):
        if key in config:
            text[key] = copy.deepcopy(config[key])
    return text
