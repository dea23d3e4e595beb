"""`TENorm` on the CPU: RMSNorm or LayerNorm as the config says, zero-centred gamma honoured."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from qwen35_bridge.megatron.cpu_backend.common import (
    TEExtraState,
    affine,
    norm_parameters,
    normalize,
)


class CPUNorm(TEExtraState, nn.Module):
    """``TENorm``: RMSNorm or LayerNorm chosen by ``config.normalization``, like TE's wrapper."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        has_residual: bool = False,
    ) -> None:
        super().__init__()
        if config.fused_residual_rmsnorm and has_residual:
            raise NotImplementedError("fused_residual_rmsnorm needs Transformer Engine")
        self.normalization = config.normalization
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.eps = eps
        self.weight, self.bias = norm_parameters(config, hidden_size, config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        y = normalize(x, self.normalization, self.eps)
        return affine(y, self.weight, self.bias, self.zero_centered_gamma, x.dtype)
