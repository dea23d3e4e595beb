"""Which config keys the inference reads, which it checks, and which are known to be inert.

Every key of a config must be in one of these tables: an unknown key might change the weights, so
it is reported rather than ignored (docs/reference.md section 1).
"""

from __future__ import annotations

from typing import Any

# Keys whose value is read into the spec (or decides the layer schedule) in a language-model config.
TEXT_ARCHITECTURAL = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "linear_conv_kernel_dim",
        "linear_key_head_dim",
        "linear_value_head_dim",
        "linear_num_key_heads",
        "linear_num_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "layer_types",
        "full_attention_interval",
        "mtp_num_hidden_layers",
        "rope_parameters",
        "rope_theta",
        "partial_rotary_factor",
        "rope_scaling",
        "max_position_embeddings",
        "tie_word_embeddings",
        "quantization_config",
    }
)

# Keys that would change the weights or the computation with another value: only these values
# are supported (the value every release uses, which is what transformers implements).
TEXT_CHECKED: dict[str, Any] = {
    "mtp_use_dedicated_embeddings": False,
    "attn_output_gate": True,
    "output_gate_type": "swish",
    "attention_bias": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "sliding_window": None,
}

# Keys known not to affect the weights or the forward computation.
INERT = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "mamba_ssm_dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "initializer_range",
        "attention_dropout",
        "router_aux_loss_coef",
        "output_router_logits",
        "language_model_only",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "tokenizer_class",
        "use_bfloat16",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)

VL_TOP_LEVEL = frozenset(
    {"text_config", "vision_config", "tie_word_embeddings", "quantization_config"}
)

VISION_ARCHITECTURAL = frozenset(
    {
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "temporal_patch_size",
        "spatial_merge_size",
        "out_hidden_size",
        "num_position_embeddings",
    }
)
VISION_CHECKED: dict[str, Any] = {
    "hidden_act": "gelu_pytorch_tanh",
    "deepstack_visual_indexes": [],
    "rope_parameters": None,
}

ROPE_KEYS = frozenset(
    {"rope_type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved"}
)

QUANTIZATION_KEYS = frozenset(
    {"quant_method", "fmt", "weight_block_size", "activation_scheme", "modules_to_not_convert"}
)
