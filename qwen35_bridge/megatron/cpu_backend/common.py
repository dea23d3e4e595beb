"""What every CPU stand-in shares: TE's `_extra_state` entry and its norm arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn


class TEExtraState:
    """TE modules carry an ``_extra_state`` entry (FP8 metadata); an empty byte tensor means none.

    Keeping the entry makes state-dict and ``torch_dist`` key sets identical to real TE's.
    """

    def get_extra_state(self) -> Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: object) -> None:
        if isinstance(state, Tensor) and state.numel() > 0:
            raise ValueError("FP8 extra state cannot be loaded by the CPU backend")


def normalize(x: Tensor, normalization: str, eps: float) -> Tensor:
    """RMSNorm or LayerNorm without affine parameters, in fp32 like TE's kernels."""
    x = x.float()
    if normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], eps=eps)
    raise ValueError(f"normalization {normalization!r}: expected 'RMSNorm' or 'LayerNorm'")


def affine(
    y: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    zero_centered_gamma: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Apply gamma (``1 + w`` when zero-centred, as TE does) and beta, then cast back."""
    gamma = weight.float() + 1 if zero_centered_gamma else weight.float()
    y = y * gamma
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def norm_parameters(
    config: TransformerConfig, size: int, sequence_parallel: bool
) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Gamma (ones, or zeros when zero-centred) and, for LayerNorm, a zero beta."""
    fill = 0.0 if config.layernorm_zero_centered_gamma else 1.0
    weight = nn.Parameter(torch.full((size,), fill, dtype=config.params_dtype))
    bias = None
    if config.normalization == "LayerNorm":
        bias = nn.Parameter(torch.zeros(size, dtype=config.params_dtype))
    for param in (weight, bias):
        if param is not None:
            param.sequence_parallel = sequence_parallel
    return weight, bias
