"""The Qwen3.5 vision tower as a megatron-core module, named as the bridges map it (docs/reference.md section 8).

``patch_embed.proj`` (Conv3d) -> plus ``pos_embed`` resampled to each frame's grid -> a
megatron-core ``TransformerBlock`` (LayerNorm with bias fused into the column-parallel linears,
biased linears, tanh-GELU MLP, 2-D rotary angles, bidirectional attention within each frame only,
as packed ``thd`` sequences) -> ``merger`` (LayerNorm, the ``m x m`` patches of a block
concatenated, exact-GELU MLP). The layers come from the backend spec provider the language model
uses (Transformer Engine, or the CPU backend that stands in for it), so their parameter names and
tensor-parallel behaviour are TE's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from torch import Tensor, nn

from qwen35_bridge.megatron.shims import install_cpu_shims
from qwen35_bridge.megatron.vl import grid as vision_grid


def gelu_tanh(x: Tensor) -> Tensor:
    """The vision MLP's activation (``gelu_pytorch_tanh``); the merger's is exact GELU."""
    return F.gelu(x, approximate="tanh")


def backend_spec_provider() -> BackendSpecProvider:
    """The provider megatron-core's GPT specs use: Transformer Engine's, or the CPU stand-in that
    ``install_cpu_shims`` puts in its place."""
    install_cpu_shims()
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.TESpecProvider()


def vision_layer_spec(backend: BackendSpecProvider) -> ModuleSpec:
    """One vision layer: pre-norm attention without a mask (packed frames keep images apart) and
    a pre-norm MLP, both norms fused into the following column-parallel linear."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_layer_norm_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=backend.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            mlp=get_mlp_module_spec_for_backend(backend),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class PatchEmbed(nn.Module):
    """``proj``: one Conv3d step per patch of ``temporal_patch x patch x patch`` pixels."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        in_channels: int,
        patch_size: int,
        temporal_patch_size: int,
    ) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.kernel = kernel
        self.in_channels = in_channels
        self.proj = nn.Conv3d(
            in_channels,
            config.hidden_size,
            kernel,
            stride=kernel,
            bias=True,
            dtype=config.params_dtype,
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[patches, in_channels * t * p * p]`` -> ``[patches, hidden]``."""
        patches = pixel_values.view(-1, self.in_channels, *self.kernel).to(self.proj.weight.dtype)
        return self.proj(patches).flatten(1)


class PatchMerger(MegatronModule):
    """``patch_norm`` on each patch, then the ``m x m`` patches of a block side by side through a
    column-parallel ``linear_fc1``, exact GELU and a row-parallel ``linear_fc2``."""

    def __init__(
        self,
        config: TransformerConfig,
        backend: BackendSpecProvider,
        *,
        spatial_merge_size: int,
        out_hidden_size: int,
    ) -> None:
        super().__init__(config=config)
        self.merged_size = config.hidden_size * spatial_merge_size**2
        self.patch_norm = backend.layer_norm()(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.linear_fc1 = backend.column_parallel_linear()(
            self.merged_size,
            self.merged_size,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=True,
            skip_bias_add=False,
            is_expert=False,
        )
        self.linear_fc2 = backend.row_parallel_linear()(
            self.merged_size,
            out_hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            is_expert=False,
        )

    def forward(self, patches: Tensor) -> Tensor:
        """``[patches, 1, hidden]`` -> ``[tokens, 1, out_hidden]`` (tokens = patches / m^2)."""
        merged = self.patch_norm(patches).view(-1, 1, self.merged_size)
        hidden, _ = self.linear_fc1(merged)
        out, _ = self.linear_fc2(F.gelu(hidden))
        return out


@dataclass(frozen=True)
class VisionFeatures:
    """The tower's outputs: every patch after the last layer, and the merged tokens the language
    model receives (in the order of the grids)."""

    patches: Tensor  # [patches, hidden]
    tokens: Tensor  # [patches / m^2, out_hidden]


class VisionModel(MegatronModule):
    """Megatron's ``vision_model``: patch embedding, position table, layers, merger."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        in_channels: int,
        patch_size: int,
        temporal_patch_size: int,
        spatial_merge_size: int,
        num_position_embeddings: int,
        out_hidden_size: int,
        rotary_base: float,
    ) -> None:
        super().__init__(config=config)
        backend = backend_spec_provider()
        self.spatial_merge_size = spatial_merge_size
        self.rotary_base = rotary_base
        self.patch_embed = PatchEmbed(
            config,
            in_channels=in_channels,
            patch_size=patch_size,
            temporal_patch_size=temporal_patch_size,
        )
        self.pos_embed = nn.Embedding(
            num_position_embeddings, config.hidden_size, dtype=config.params_dtype
        )
        self.decoder = TransformerBlock(
            config=config, spec=vision_layer_spec(backend), post_layer_norm=False
        )
        self.merger = PatchMerger(
            config, backend, spatial_merge_size=spatial_merge_size, out_hidden_size=out_hidden_size
        )

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionFeatures:
        """``pixel_values`` ``[patches, in_channels * t * p * p]`` of every image (or video) in
        merge-block order, as Qwen3.5's processor emits them; ``grid_thw`` ``[n, 3]``."""
        merge = self.spatial_merge_size
        hidden = self.patch_embed(pixel_values)
        hidden = hidden + vision_grid.interpolated_position_embeddings(
            self.pos_embed.weight, grid_thw, merge
        ).to(hidden.dtype)
        head_dim = self.config.kv_channels
        angles = vision_grid.rotary_angles(grid_thw, merge, head_dim, self.rotary_base).to(
            hidden.device
        )
        bounds = vision_grid.frame_boundaries(grid_thw).to(hidden.device)
        longest = int((bounds[1:] - bounds[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=bounds,
            cu_seqlens_kv=bounds,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
        patches = self.decoder(
            hidden_states=hidden.unsqueeze(1),
            attention_mask=None,
            rotary_pos_emb=angles,
            packed_seq_params=packed,
        )
        return VisionFeatures(patches=patches.squeeze(1), tokens=self.merger(patches).squeeze(1))
