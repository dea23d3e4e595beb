"""`codegen summary REF`: a bridge described in Markdown for the pull request that adds or changes it,
so that a reviewer sees what it does without reading its mapping table."""

from __future__ import annotations

from collections import Counter

from qwen35_bridge import targets
from qwen35_codegen import pipeline
from qwen35_codegen.rendering import describe
from qwen35_codegen.review import manifest
from qwen35_codegen.review.key_families import format_ranges
from qwen35_codegen.spec.model_spec import ModelSpec

MLP_NAMES = {"dense": "dense MLP", "moe": "MoE"}
COMPONENT_TITLES = {
    "embedding": "embedding",
    "gdn_layers": "GatedDeltaNet layers (mixer and input norm)",
    "attention_layers": "attention layers (mixer and input norm)",
    "dense_mlp": "dense MLP (with its norm)",
    "moe_router": "MoE router and pre-MLP norm",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts (with their gate)",
    "mtp": "MTP layers",
    "vision": "vision tower",
    "final_norm": "final norm",
    "output_layer": "output layer",
}


def render(generated: pipeline.Generated) -> str:
    """Markdown: source, architecture, layer kinds, layouts, parameters, key counts, the command."""
    spec, source = generated.spec, generated.source
    data = manifest.parse(generated.manifest, manifest.file_name(generated.module))
    index = f"index sha256 `{source.index_sha256[:12]}`" if source.index_sha256 else "no index"
    hybrid = generated.entry.target == "hybrid"
    lines = [
        f"## Bridge for {source.model_id}: `qwen35_bridge/generated/{generated.module}.py`",
        "",
        f"**Config:** {source.provenance} (`{source.ref}`, config sha256 `{source.config_sha256[:12]}`, {index}).",
        "",
        f"**Architecture.** {describe.one_line(spec)} {_dimensions(spec)}",
        "",
        *([_hybrid_model(spec), ""] if hybrid else []),
        "| Layers | Count | Indices |",
        "|---|---:|---|",
        *_layer_rows(spec),
        "",
        "| Layout | |",
        "|---|---|",
        *_layout_rows(spec),
        "",
        *(["**Notes:**", *(f"- {note}" for note in spec.notes), ""] if spec.notes else []),
        "| Component | Parameters |",
        "|---|---:|",
        *(
            f"| {COMPONENT_TITLES[name]} | {count:,} |"
            for name, count in data["parameters"].items()
            if count and name != "total"
        ),
        f"| **total** | **{data['parameters']['total']:,}** ({data['parameters']['total'] / 1e9:.2f} B) |",
        "",
        f"**Key manifest** (`qwen35_bridge/generated/{manifest.file_name(generated.module)}`): "
        f"{_side(data, 'hf')} on the HF side, {_side(data, 'megatron')} on the Megatron side.",
        "",
        f"**Regenerate:** `{pipeline.command_of(source.ref, generated.entry.options)}`",
    ]
    return "\n".join(lines) + "\n"


def _dimensions(spec: ModelSpec) -> str:
    a, g = spec.attention, spec.gdn
    rope = f"rope theta {_number(a.rope_theta)}"
    if a.mrope_section:
        rope += f", mRoPE sections {'/'.join(map(str, a.mrope_section))}{' interleaved' if a.mrope_interleaved else ''}"
    return (
        f"Hidden size {spec.hidden_size}, vocabulary {spec.vocab_size}. Attention: {a.num_heads} query heads "
        f"(each with an output gate) and {a.num_kv_heads} KV heads of dimension {a.head_dim}, rotary on "
        f"{a.rotary_percent:.0%} of it ({rope}). GatedDeltaNet: {g.num_key_heads} key heads of {g.key_head_dim}, "
        f"{g.num_value_heads} value heads of {g.value_head_dim}, conv kernel {g.conv_kernel}."
    )


def _hybrid_model(spec: ModelSpec) -> str:
    pattern = targets.hybrid_layer_pattern(
        spec.layer_types, spec.mlp_types, spec.mtp_layers, spec.mtp_mlp_type
    )
    return (
        f"**Megatron model: HybridModel**, layer pattern `{pattern}` ({2 * spec.num_layers} "
        "decoder layers): HF layer i is its layers 2i (the mixer, with the input norm) and "
        "2i + 1 (the MLP, with its norm); each MTP layer is the pair after a `/`."
    )


def _layer_rows(spec: ModelSpec) -> list[str]:
    kinds = Counter(zip(spec.layer_types, spec.mlp_types))
    rows = []
    for (mixer, mlp), count in kinds.items():
        layers = [
            i
            for i, kind in enumerate(zip(spec.layer_types, spec.mlp_types))
            if kind == (mixer, mlp)
        ]
        rows.append(
            f"| {describe.MIXER_NAMES[mixer]} + {MLP_NAMES[mlp]} | {count} | {format_ranges(layers)} |"
        )
    if spec.mtp_layers:
        rows.append(
            f"| MTP: gated attention + {MLP_NAMES[spec.mtp_mlp_type or 'dense']} | {spec.mtp_layers} | {format_ranges(range(spec.mtp_layers))} |"
        )
    if spec.vision:
        rows.append(
            f"| vision blocks ({spec.vision.hidden_size} wide) | {spec.vision.depth} | {format_ranges(range(spec.vision.depth))} |"
        )
    return rows


def _layout_rows(spec: ModelSpec) -> list[str]:
    q = spec.quantization
    quantization = "none"
    if q:
        block = f"{q.weight_block_size[0]}x{q.weight_block_size[1]}"
        quantization = f"FP8 {q.fmt} in {block} blocks; each `X.weight_scale_inv` beside its weight is not in the key manifest"
    rows = {
        "HF prefix": f"`{spec.hf_prefix}`",
        "routed experts (decoder)": spec.experts_layout or "none (dense)",
        "MTP experts": spec.mtp_experts_layout
        or ("none (dense MTP)" if spec.mtp_layers else "no MTP layer"),
        "output layer": "tied to the embedding" if spec.tie_word_embeddings else "untied",
        "quantization": quantization,
    }
    return [f"| {name} | {value} |" for name, value in rows.items()]


def _side(data: manifest.Manifest, side: str) -> str:
    return f"{data[side]['keys']:,} tensors in {len(data[side]['families'])} families"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
