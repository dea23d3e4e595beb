"""The ModelSpec: a frozen, typed, plain-data description of one model's architecture.

Everything a bridge depends on is here and nothing else: two configs that give the same spec give
the same weights layout, so the spec's fingerprint (not the config's bytes) identifies a bridge.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FamilyName = Literal["qwen3_5", "qwen3_5_moe", "qwen3_next"]
LayerType = Literal["gdn", "attention"]
MlpType = Literal["dense", "moe"]
ExpertsLayout = Literal["packed", "per_expert"]
EXPERTS_LAYOUTS: tuple[str, ...] = ("packed", "per_expert")


@dataclass(frozen=True)
class AttentionSpec:
    """Gated softmax attention (full_attention layers and MTP layers)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_percent: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None
    mrope_interleaved: bool

    @property
    def q_rows(self) -> int:
        """Rows of HF q_proj: a query and a gate per head."""
        return self.num_heads * 2 * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        """Input width of o_proj / linear_proj."""
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class GDNSpec:
    """Gated DeltaNet (linear_attention layers). `hf_layout` is how HF stores the input projection:
    `split` (in_proj_qkv/z/b/a, Qwen3.5/3.6) or `grouped` (in_proj_qkvz/ba per key head, Qwen3-Next).
    """

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    hf_layout: Literal["split", "grouped"]

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv1d: q, k and v."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class MoESpec:
    """Routed experts with one gated shared expert. `renormalize` is top-k renormalisation."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int
    renormalize: bool


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower of a VL checkpoint."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int

    @property
    def merged_dim(self) -> int:
        """Width of the merger's input: the patches merged by spatial_merge_size squared."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class QuantizationSpec:
    """Block-quantised FP8 weights: `weight` in float8 plus `weight_scale_inv` per block."""

    method: Literal["fp8"]
    fmt: Literal["e4m3"]
    weight_block_size: tuple[int, int]
    activation_scheme: str
    modules_to_not_convert: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture and on-disk layout, as far as a bridge depends on it.

    `notes` record how undecided values were settled (assumptions, layouts taken from the catalog);
    they are for reviewers and are left out of the fingerprint.
    """

    family: FamilyName
    architecture: str
    hf_prefix: str
    vision: VisionSpec | None
    vocab_size: int
    hidden_size: int
    num_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    layer_types: tuple[LayerType, ...]
    mlp_types: tuple[MlpType, ...]
    dense_intermediate_size: int | None
    attention: AttentionSpec
    gdn: GDNSpec
    moe: MoESpec | None
    experts_layout: ExpertsLayout | None
    mtp_layers: int
    mtp_mlp_type: MlpType | None
    mtp_experts_layout: ExpertsLayout | None
    tie_word_embeddings: bool
    quantization: QuantizationSpec | None
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    @property
    def megatron_prefix(self) -> str:
        """Megatron-side prefix of language-model parameters (`language_model.` in VL models)."""
        return "language_model." if self.is_vl else ""

    @property
    def needs_mtp_experts_choice(self) -> bool:
        """True when only the user can say how the MTP layer's experts are stored."""
        return (
            self.mtp_layers > 0 and self.mtp_mlp_type == "moe" and self.mtp_experts_layout is None
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    def canonical_json(self) -> str:
        """Stable JSON of the architecture alone (no notes): the input of the fingerprint."""
        data = self.to_dict()
        del data["notes"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict` (JSON lists become tuples again)."""
        d = dict(data)
        d["attention"] = AttentionSpec(**_tuples(d["attention"]))
        d["gdn"] = GDNSpec(**d["gdn"])
        d["moe"] = MoESpec(**d["moe"]) if d["moe"] else None
        d["vision"] = VisionSpec(**d["vision"]) if d["vision"] else None
        d["quantization"] = (
            QuantizationSpec(**_tuples(d["quantization"])) if d["quantization"] else None
        )
        return cls(**_tuples(d))


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
