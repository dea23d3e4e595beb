"""Plain-English descriptions of a spec, shared by generated docstrings, summaries and diffs."""

from __future__ import annotations

from qwen35_codegen.spec.model_spec import ModelSpec

MIXER_NAMES = {"gdn": "GatedDeltaNet", "attention": "gated attention"}


def period(items: tuple[str, ...]) -> int:
    """Length of the shortest block that repeats to give `items` (its own length if none does)."""
    n = len(items)
    for p in range(1, n + 1):
        if n % p == 0 and items == items[:p] * (n // p):
            return p
    return n


def schedule(spec: ModelSpec) -> str:
    """E.g. `64 layers = 16 x (3 x GatedDeltaNet + 1 x gated attention)`."""
    types = spec.layer_types
    p = period(types)
    runs: list[tuple[str, int]] = []
    for kind in types[:p]:
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + 1)
        else:
            runs.append((kind, 1))
    if p == len(types) and len(runs) > 2:
        counts = ", ".join(
            f"{types.count(k)} x {MIXER_NAMES[k]}" for k in MIXER_NAMES if k in types
        )
        return f"{len(types)} layers, irregular schedule: {counts}"
    block = " + ".join(f"{count} x {MIXER_NAMES[kind]}" for kind, count in runs)
    return f"{len(types)} layers = {len(types) // p} x ({block})"


def mlp(spec: ModelSpec) -> str:
    parts = []
    if "dense" in spec.mlp_types:
        where = (
            "every layer"
            if "moe" not in spec.mlp_types
            else f"{spec.mlp_types.count('dense')} layers"
        )
        parts.append(f"dense SwiGLU MLP {spec.dense_intermediate_size} ({where})")
    if spec.moe:
        m = spec.moe
        where = (
            "every layer"
            if "dense" not in spec.mlp_types
            else f"{spec.mlp_types.count('moe')} layers"
        )
        parts.append(
            f"MoE ({where}): {m.num_experts} experts, top-{m.top_k}, expert {m.expert_intermediate_size}, "
            f"gated shared expert {m.shared_expert_intermediate_size}"
        )
    return "; ".join(parts)


def mtp(spec: ModelSpec) -> str:
    if not spec.mtp_layers:
        return "no MTP layer"
    plural = "s" if spec.mtp_layers > 1 else ""
    mlp_name = {"moe": "MoE", "dense": "dense"}[spec.mtp_mlp_type or "dense"]
    return f"{spec.mtp_layers} MTP layer{plural} (gated attention + {mlp_name} MLP)"


def output(spec: ModelSpec) -> str:
    return (
        "output layer tied to the embedding" if spec.tie_word_embeddings else "untied output layer"
    )


def vision(spec: ModelSpec) -> str:
    if not spec.vision:
        return "text only"
    v = spec.vision
    return (
        f"vision tower {v.depth} x {v.hidden_size} (MLP {v.intermediate_size}, {v.num_heads} heads)"
    )


def layouts(spec: ModelSpec) -> str:
    parts = [f"HF prefix '{spec.hf_prefix}'"]
    if spec.experts_layout:
        parts.append(f"decoder experts {spec.experts_layout}")
    if spec.mtp_experts_layout:
        parts.append(f"MTP experts {spec.mtp_experts_layout}")
    if spec.quantization:
        q = spec.quantization
        parts.append(
            f"FP8 {q.fmt} weights in {q.weight_block_size[0]}x{q.weight_block_size[1]} blocks"
        )
    return ", ".join(parts)


def one_line(spec: ModelSpec) -> str:
    """The architecture in one sentence, as a generated module's docstring opens."""
    return f"{schedule(spec)}, {mlp(spec)}, {mtp(spec)}, {output(spec)}, {vision(spec)}."
