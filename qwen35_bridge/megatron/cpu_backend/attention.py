"""TE's core attention on the CPU: softmax attention in `sbhd` or packed `thd` layout, GQA-aware,
with the mask pattern its mask type says (causal for the language model, none per image for a
vision tower)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from qwen35_bridge.megatron.cpu_backend.common import TEExtraState

_CAUSAL_TOP_LEFT = (AttnMaskType.causal, AttnMaskType.padding_causal)
_USES_MASK_TENSOR = (
    AttnMaskType.padding,
    AttnMaskType.padding_causal,
    AttnMaskType.arbitrary,
)


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_type: AttnMaskType,
    scale: float,
    p: float,
) -> Tensor:
    """Softmax attention over ``[b, h, s, d]``; ``mask`` is Megatron's (True = masked out).

    Causal masks are aligned top-left, ``causal_bottom_right`` bottom-right, as in TE.
    """
    sq, sk = q.shape[-2], k.shape[-2]
    allowed = None
    if mask_type in _CAUSAL_TOP_LEFT or mask_type == AttnMaskType.causal_bottom_right:
        diagonal = sk - sq if mask_type == AttnMaskType.causal_bottom_right else 0
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal)
    if mask is not None and mask_type in _USES_MASK_TENSOR:
        allowed = ~mask if allowed is None else allowed & ~mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scale)


class CPUDotProductAttention(TEExtraState, nn.Module):
    """``TEDotProductAttention`` in ``sbhd`` (or packed ``thd``) layout, GQA-aware.

    The mask type decides the pattern: causal for the language model, ``no_mask``/``padding``
    for a bidirectional vision tower, where packed ``cu_seqlens`` keep images apart.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        num_splits: int | None = None,
        cp_comm_type: str | None = "p2p",
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__()
        if config.context_parallel_size > 1 or config.window_size is not None:
            raise NotImplementedError("context parallelism and sliding windows need TE")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"softmax_type {config.softmax_type!r} needs TE")
        self.config = config
        self.attn_mask_type = attn_mask_type
        kv_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        num_splits: int | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias needs Transformer Engine")
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, mask_type)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        k, v = self._expand_groups(q, k), self._expand_groups(q, v)
        out = _attend(q, k, v, attention_mask, mask_type, self.softmax_scale, self._dropout_p())
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @staticmethod
    def _expand_groups(q: Tensor, kv: Tensor) -> Tensor:
        """Repeat each KV head for the query heads of its group (``dim`` = heads)."""
        return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)

    def _packed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        params: PackedSeqParams,
        mask_type: AttnMaskType,
    ) -> Tensor:
        """``thd`` layout: attend within each sequence; padding slots between them stay zero."""
        starts_q = _segment_starts(params.cu_seqlens_q, params.cu_seqlens_q_padded)
        starts_kv = _segment_starts(params.cu_seqlens_kv, params.cu_seqlens_kv_padded)
        lengths_q = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
        lengths_kv = (params.cu_seqlens_kv[1:] - params.cu_seqlens_kv[:-1]).tolist()
        out = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
        for sq0, lq, skv0, lkv in zip(starts_q, lengths_q, starts_kv, lengths_kv):
            # [t, h, d] -> [1, h, t, d]
            q = query[sq0 : sq0 + lq].transpose(0, 1).unsqueeze(0)
            k = key[skv0 : skv0 + lkv].transpose(0, 1).unsqueeze(0)
            v = value[skv0 : skv0 + lkv].transpose(0, 1).unsqueeze(0)
            k, v = self._expand_groups(q, k), self._expand_groups(q, v)
            seg = _attend(q, k, v, None, mask_type, self.softmax_scale, self._dropout_p())
            out[sq0 : sq0 + lq] = seg.squeeze(0).transpose(0, 1)
        return out.reshape(out.shape[0], -1)

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Nothing to checkpoint: Megatron's TE wrapper saves only a learnable softmax offset."""
        return {}


def _segment_starts(cu_seqlens: Tensor, cu_seqlens_padded: Tensor | None) -> list[int]:
    """Memory offset of each packed sequence (the padded boundaries when given)."""
    bounds = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens
    return bounds[:-1].tolist()
