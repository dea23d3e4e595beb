"""Build megatron-core's real Qwen3.5 GPTModel and read its logits (or HybridModel's, which
`hybrid.py` builds: the logits path is the same), on CPU or GPU.

The model comes from megatron-core's own hybrid spec (Gated DeltaNet + gated attention) and MTP
block spec, so a bridge is proven against the code that trains these models; on a machine
without Transformer Engine ``megatron_shims`` supplies the CPU backend first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from qwen35_bridge.megatron.shims import install_cpu_shims

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig


def cpu_config_overrides() -> dict[str, Any]:
    """``TransformerConfig`` values a CPU run needs (docs/reference.md section 10).

    The hybrid spec insists on the TE implementation (the CPU backend stands in for it); the
    deterministic mode selects GDN's pure-torch delta rule and conv1d; fused kernels are CUDA
    only; the ``alltoall`` dispatcher needs CUDA streams. Weights are loaded, not initialised.
    """
    return {
        "transformer_impl": "transformer_engine",
        "deterministic_mode": True,
        "use_cpu_initialization": True,
        "perform_initialization": False,
        "moe_token_dispatcher_type": "allgather",
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "moe_permute_fusion": False,
        "moe_router_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "cross_entropy_loss_fusion": False,
        "fused_residual_rmsnorm": False,
    }


def build_gpt_model(
    config: TransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    rotary_percent: float,
    rotary_base: float,
    share_embeddings_and_output_weights: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """This pipeline stage's ``GPTModel`` (its virtual-pipeline chunk `vp_stage`, when the
    pipeline is interleaved) from the hybrid spec, with MTP on the last stage's last chunk.

    Parallel state must be initialised first (``parallel.init_parallel``).
    """
    install_cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
        get_transformer_block_with_experimental_attention_variant_spec,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    block_spec = get_transformer_block_with_experimental_attention_variant_spec(
        config, vp_stage=vp_stage, pp_rank=pp_rank
    )
    mtp_spec = None
    if config.mtp_num_layers:
        mtp_spec = get_gpt_mtp_block_spec(
            config, block_spec, use_transformer_engine=True, vp_stage=vp_stage, pp_rank=pp_rank
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        mtp_block_spec=mtp_spec,
        vp_stage=vp_stage,
    )


@torch.no_grad()
def forward_logits(model: GPTModel, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Full-vocabulary logits ``[b, s, V]`` of the main head and of each MTP layer, in eval mode
    (GPTModel or HybridModel: both run the MTP block, then the output layer per MTP layer and for
    the main head).

    Every rank returns the same tensors: vocab-parallel logits are gathered over TP, and with
    pipeline parallelism the stages run in order (hidden states sent over the process group)
    and the last stage broadcasts its logits.
    """
    from megatron.core import parallel_state

    was_training = model.training
    model.eval()
    try:
        heads = _run_stage(model, input_ids)
    finally:
        model.train(was_training)
    num_heads = 1 + (model.config.mtp_num_layers or 0)
    if model.post_process and len(heads) != num_heads:
        raise RuntimeError(f"expected {num_heads} output-layer calls, saw {len(heads)}")
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shape = (*input_ids.shape, model.vocab_size)
        heads = _broadcast_from_last_stage(heads, num_heads, shape, model.config.params_dtype)
    return heads[-1], heads[:-1]


def _run_stage(model: GPTModel, input_ids: Tensor) -> list[Tensor]:
    """This stage's forward; on the last stage, every output-layer call's gathered logits.

    The output layer runs once per MTP layer, then for the main head (megatron-core 0.19.2);
    each output is cloned inside the hook because later calls may reuse the buffer.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = input_ids.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    if not model.pre_process:
        model.set_input_tensor(_receive_hidden(model, batch, seq))
    captured: list[Tensor] = []
    handle = None
    if model.post_process:
        handle = model.output_layer.register_forward_hook(
            lambda _module, _inputs, output: captured.append(output[0].clone())
        )
    try:
        output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    finally:
        if handle is not None:
            handle.remove()
    if not model.post_process:
        dist.send(output.contiguous(), parallel_state.get_pipeline_model_parallel_next_rank())
        return []
    # [s, b, V/tp] -> [b, s, V]
    return [
        gather_from_tensor_model_parallel_region(t).transpose(0, 1).contiguous() for t in captured
    ]


def _receive_hidden(model: GPTModel, batch: int, seq: int) -> Tensor:
    """The previous stage's hidden states ``[s (/tp with sequence parallel), b, h]``."""
    from megatron.core import parallel_state

    config = model.config
    local_seq = seq // config.tensor_model_parallel_size if config.sequence_parallel else seq
    hidden = torch.empty(local_seq, batch, config.hidden_size, dtype=config.params_dtype)
    dist.recv(hidden, parallel_state.get_pipeline_model_parallel_prev_rank())
    return hidden


def _broadcast_from_last_stage(
    heads: list[Tensor], num_heads: int, shape: tuple[int, ...], dtype: torch.dtype
) -> list[Tensor]:
    """Every pipeline rank gets the last stage's logits (other ranks pass ``heads=[]``)."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    source = parallel_state.get_pipeline_model_parallel_last_rank()
    if not parallel_state.is_pipeline_last_stage():
        heads = [torch.empty(shape, dtype=dtype) for _ in range(num_heads)]
    for tensor in heads:
        dist.broadcast(tensor, source, group=group)
    return heads
