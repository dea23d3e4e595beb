"""`TESpecProvider` answering with the CPU layers, the one name the shims put in TE's place."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from megatron.core.models.backends import BackendSpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import (
    GroupedMLPSubmodules,
    SequentialMLP,
    TEGroupedMLP,
)
from torch import nn

from qwen35_bridge.megatron.cpu_backend.attention import CPUDotProductAttention
from qwen35_bridge.megatron.cpu_backend.grouped import (
    CPUColumnParallelGroupedLinear,
    CPURowParallelGroupedLinear,
)
from qwen35_bridge.megatron.cpu_backend.linear import (
    CPUColumnParallelLinear,
    CPULayerNormColumnParallelLinear,
    CPULinear,
    CPURowParallelLinear,
)
from qwen35_bridge.megatron.cpu_backend.norm import CPUNorm


class CPUSpecProvider(BackendSpecProvider):
    """``TESpecProvider`` answering with the CPU layers above."""

    def linear(self) -> type:
        return CPULinear

    def column_parallel_linear(self) -> type:
        return CPUColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return CPURowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> type:
        return CPULayerNormColumnParallelLinear

    def layer_norm(
        self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False
    ) -> Callable[..., CPUNorm]:
        return partial(CPUNorm, has_residual=has_residual) if has_residual else CPUNorm

    def core_attention(self) -> type:
        return CPUDotProductAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool) -> Callable[..., nn.Module]:
        if moe_use_grouped_gemm:
            return partial(
                TEGroupedMLP,
                submodules=GroupedMLPSubmodules(
                    linear_fc1=CPUColumnParallelGroupedLinear,
                    linear_fc2=CPURowParallelGroupedLinear,
                    activation_func=None,
                ),
            )
        return partial(
            SequentialMLP,
            submodules=MLPSubmodules(
                linear_fc1=CPUColumnParallelLinear,
                linear_fc2=CPURowParallelLinear,
                activation_func=None,
            ),
        )

    def activation_func(self) -> None:
        """TE's fused activation op does not exist here; layers use ``config.activation_func``."""
        return None
