"""A reference Multi-Token Prediction forward built from HF modules.

transformers has no MTP module for this family (it drops `mtp.*` when loading and never saves
it), so `verify` computes the expected MTP logits with the same HF building blocks the main
model uses: the family's decoder layer class (one full-attention layer), its
zero-centred RMSNorm, a bias-free Linear for `fc`, and the main model's rotary embedding and
output layer. Semantics: docs/reference.md section 7.
"""

from __future__ import annotations

import importlib

import torch
import transformers
from torch import nn

from qwen35_bridge.families import family_of_text_model_type
from qwen35_bridge.reference.expert_layouts import pack_experts
from qwen35_bridge.reference.hf_kernels import use_torch_gdn_kernels
from qwen35_bridge.reference.hf_models import hf_config, language_model

MTP_PREFIX = "mtp."


class ReferenceMTP(nn.Module):
    """One MTP layer with HF's parameter names under `mtp.`: fc, pre_fc_norm_embedding,
    pre_fc_norm_hidden, layers.0 (full-attention decoder layer), norm."""

    def __init__(self, text_config: transformers.PreTrainedConfig, *, moe: bool) -> None:
        super().__init__()
        family = family_of_text_model_type(text_config.model_type)
        modeling = importlib.import_module(family.modeling_module)
        norm_cls = getattr(modeling, f"{family.class_prefix}RMSNorm")
        layer_cls = getattr(modeling, f"{family.class_prefix}DecoderLayer")
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = norm_cls(hidden, eps=eps)
        self.pre_fc_norm_hidden = norm_cls(hidden, eps=eps)
        self.layers = nn.ModuleList([layer_cls(mtp_layer_config(text_config, moe=moe), 0)])
        self.norm = norm_cls(hidden, eps=eps)

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeds: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """`hidden` after the main model's final norm; `next_embeds` = embedding of x[t+1]."""
        x = self.fc(
            torch.cat(
                [self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1
            )
        )
        mask = causal_mask(x.shape[1], x.dtype)
        x = self.layers[0](
            x,
            position_embeddings=position_embeddings,
            attention_mask=mask,
            position_ids=position_ids,
        )
        return self.norm(x)


def mtp_layer_config(
    text_config: transformers.PreTrainedConfig, *, moe: bool
) -> transformers.PreTrainedConfig:
    """The text config with a one-layer, full-attention schedule whose layer 0 has the MLP kind
    `moe` (Qwen3-Next decides per layer; Qwen3.5 by family)."""
    raw = text_config.to_dict()
    raw.update(num_hidden_layers=1, layer_types=["full_attention"])
    raw.pop("full_attention_interval", None)
    if raw["model_type"] == "qwen3_next":
        raw.update(mlp_only_layers=[] if moe else [0], decoder_sparse_step=1)
    cfg = hf_config(raw)
    cfg._attn_implementation = getattr(text_config, "_attn_implementation", None) or "sdpa"
    return cfg


def causal_mask(seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask `[1, 1, S, S]`, valid for eager and SDPA attention alike."""
    full = torch.full((seq, seq), torch.finfo(dtype).min, dtype=dtype)
    return torch.triu(full, diagonal=1)[None, None]


def load_reference_mtp(
    model: transformers.PreTrainedModel, mtp: dict[str, torch.Tensor]
) -> ReferenceMTP:
    """A ReferenceMTP for `model` holding exactly the tensors `mtp` (either experts layout)."""
    lm = language_model(model)
    moe = hasattr(lm.layers[-1].mlp, "experts")
    module = ReferenceMTP(model.config.get_text_config(), moe=moe)
    stripped = {k[len(MTP_PREFIX) :]: v for k, v in mtp.items()}
    module.load_state_dict(pack_experts(stripped), strict=True)
    dtype = lm.embed_tokens.weight.dtype
    return module.to(dtype).eval()


@torch.no_grad()
def reference_mtp_logits(
    model: transformers.PreTrainedModel, mtp: dict[str, torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """MTP logits `[B, S, V]` of one MTP layer on top of `model`, for text-only `input_ids`.

    `h' = fc(cat([pre_fc_norm_embedding(embed(x[t+1])), pre_fc_norm_hidden(h[t])]))` with `h` the
    main model's output after its final norm, then the decoder layer (rotary positions 0..S-1,
    the main model's rotary module; for VL that is mRoPE with t = h = w positions, which equals
    plain RoPE), then `mtp.norm`, then the shared output layer (lm_head, or the embedding when
    tied). Like Megatron, the ids are shifted left with a zero fill: the last position embeds
    token id 0, so all S positions are comparable.
    """
    use_torch_gdn_kernels()
    lm = language_model(model)
    module = load_reference_mtp(model, mtp)
    hidden = lm(input_ids=input_ids).last_hidden_state
    shifted = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
    next_embeds = lm.embed_tokens(shifted)
    position_ids = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
    position_embeddings = lm.rotary_emb(hidden, position_ids)
    out = module(hidden, next_embeds, position_embeddings, position_ids)
    return model.get_output_embeddings()(out)
