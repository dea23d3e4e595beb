"""Head and block dimensions that parametrise the transforms; plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionDims:
    """Gated softmax attention: `heads` query heads in `kv_heads` groups of `head_dim`."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class GDNDims:
    """Gated DeltaNet: `key_heads` x `key_head_dim` for q and k, `value_heads` x `value_head_dim`."""

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int

    @property
    def in_proj_sections(self) -> tuple[int, ...]:
        """Rows of Megatron's in_proj: q, k, v, z, beta, alpha."""
        qk, v = self.key_heads * self.key_head_dim, self.value_heads * self.value_head_dim
        return (qk, qk, v, v, self.value_heads, self.value_heads)

    @property
    def conv_sections(self) -> tuple[int, ...]:
        """Channels of the causal conv1d: q, k, v."""
        return self.in_proj_sections[:3]


@dataclass(frozen=True)
class VisionDims:
    """Vision attention: `heads` heads of `hidden // heads`, plain (ungated) QKV."""

    heads: int
    hidden: int
