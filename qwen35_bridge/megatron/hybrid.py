"""Build megatron-core's HybridModel for a bridge whose target is `hybrid`, on CPU or GPU.

HybridModel (megatron-core 0.19 recommends it over GPTModel) takes the layers from a pattern
string: each logical layer is a mixer (`G` GDN, `*` gated attention) then an MLP (`-` dense, `E`
MoE), and each MTP layer, after a `/`, is such a pair too. The stack spec is megatron-core's own
`hybrid_stack_spec`; without Transformer Engine, the same spec with the CPU backend's layers in
TE's places (`cpu_backend.hybrid_stack`). Pipeline stages are marked in the pattern with `|`, at
whole logical layers, so each stage holds the layers GPTModel would give it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwen35_bridge.megatron.shims import install_cpu_shims
from qwen35_bridge.targets import pipeline_pattern

if TYPE_CHECKING:
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec


def stack_spec(config: TransformerConfig) -> ModuleSpec:
    """megatron-core's hybrid stack spec, or its CPU form where Transformer Engine is absent."""
    if not install_cpu_shims():
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return hybrid_stack_spec
    from qwen35_bridge.megatron.cpu_backend.hybrid_stack import cpu_hybrid_stack_spec

    return cpu_hybrid_stack_spec(config.num_moe_experts)


def staged_pattern(config: TransformerConfig, pattern: str) -> str:
    """The pattern with a `|` between pipeline segments when the model is pipelined (megatron-core
    splits an unmarked pattern by physical layers, with a deprecation warning, and refuses one with
    virtual stages). Uneven first or last stages are not expressed here: refused by name."""
    for name in ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"):
        if getattr(config, name) is not None:
            raise NotImplementedError(f"{name}: uneven pipeline stages are not supported")
    segments = config.pipeline_model_parallel_size * (
        config.virtual_pipeline_model_parallel_size or 1
    )
    return pipeline_pattern(pattern, segments) if segments > 1 else pattern


def build_hybrid_model(
    config: TransformerConfig,
    *,
    hybrid_layer_pattern: str,
    vocab_size: int,
    max_sequence_length: int,
    rotary_percent: float,
    rotary_base: float,
    share_embeddings_and_output_weights: bool,
    vp_stage: int | None = None,
) -> HybridModel:
    """This pipeline stage's ``HybridModel`` (its virtual-pipeline chunk `vp_stage`, when the
    pipeline is interleaved); megatron-core places MTP on the last stage's last chunk.

    Parallel state must be initialised first (``parallel.init_parallel``).
    """
    install_cpu_shims()
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(
        config=config,
        hybrid_stack_spec=stack_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        hybrid_layer_pattern=staged_pattern(config, hybrid_layer_pattern),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
