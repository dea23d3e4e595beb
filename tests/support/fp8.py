"""FP8 block quantisation of test checkpoints, in the layout of the published FP8 releases.

docs/reference.md section 6: a quantised linear stores `weight` in float8_e4m3fn plus `weight_scale_inv`
(float32, one value per `block x block` tile, partial tiles at the edges); the real value is
`weight * scale_inv` broadcast over each tile. Releases use 128x128 tiles; tiny models use a
smaller `block` (recorded in the tiny config's `quantization_config.weight_block_size`).
"""

from __future__ import annotations

import math
import re

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
EMBEDDINGS = ("embed_tokens", "pos_embed")
_PACKED_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


def scale_key(key: str) -> str:
    """`x.weight` -> `x.weight_scale_inv`; packed `...experts.gate_up_proj` -> `..._scale_inv`."""
    return (
        key[: -len(".weight")] + ".weight_scale_inv"
        if key.endswith(".weight")
        else key + "_scale_inv"
    )


def excluded(module: str, modules_to_not_convert: list[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary (also as a
    regex), or as a suffix; `mlp.gate` does not match `mlp.gate_proj`."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(
        re.match(rf"(?:{p}){boundary}", module) or module.endswith(p)
        for p in modules_to_not_convert
    )


def quantizable(key: str, tensor: torch.Tensor, modules_to_not_convert: list[str]) -> bool:
    """Linear weights (2-D `.weight`, or packed 3-D experts), not embeddings, not excluded."""
    packed = bool(_PACKED_EXPERTS.search(key)) and tensor.ndim == 3
    linear = (
        key.endswith(".weight")
        and tensor.ndim == 2
        and not any(f".{e}." in f".{key}" for e in EMBEDDINGS)
    )
    module = key.rsplit(".", 1)[0]
    return (packed or linear) and not excluded(module, modules_to_not_convert)


def quantize_block(
    weight: torch.Tensor, block: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv) over the last two dims, `block x block` tiles. The scale is rounded
    to `scale_dtype` before the weight is divided by it, so dequantising uses the exact scale."""
    rows, cols = weight.shape[-2:]
    tiles = (math.ceil(rows / block), math.ceil(cols / block))
    w = weight.to(torch.float32)
    amax = _tile_reduce(w.abs(), block, tiles)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (
        (w / _expand(scale_inv.to(torch.float32), block, rows, cols))
        .clamp(-FP8_MAX, FP8_MAX)
        .to(FP8_DTYPE)
    )
    return q, scale_inv


def dequantize_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int, dtype: torch.dtype
) -> torch.Tensor:
    """`weight * scale_inv` broadcast over each tile, in `dtype`."""
    rows, cols = weight.shape[-2:]
    return (weight.to(torch.float32) * _expand(scale_inv.to(torch.float32), block, rows, cols)).to(
        dtype
    )


def _tile_reduce(w: torch.Tensor, block: int, tiles: tuple[int, int]) -> torch.Tensor:
    rows, cols = w.shape[-2:]
    padded = torch.nn.functional.pad(w, (0, tiles[1] * block - cols, 0, tiles[0] * block - rows))
    shaped = padded.reshape(*w.shape[:-2], tiles[0], block, tiles[1], block)
    return shaped.amax(dim=(-3, -1))


def _expand(scale: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block, dim=-2)[..., :rows, :].repeat_interleave(block, dim=-1)[
        ..., :cols
    ]


def quantize_fp8_blockwise(
    state: dict[str, torch.Tensor],
    *,
    block: int = 128,
    modules_to_not_convert: list[str] = (),
    scale_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """FP8-quantise the linear weights of an HF state dict; each gets its `*_scale_inv` right after
    it. Norms, biases, embeddings, conv weights and excluded modules pass through unchanged.
    `scale_dtype`: float32 (DeepSeek-V3 style); some Qwen3 FP8 releases store bfloat16 scales."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if quantizable(key, tensor, list(modules_to_not_convert)):
            out[key], out[scale_key(key)] = quantize_block(tensor, block, scale_dtype)
        else:
            out[key] = tensor
    return out


def dequantize_fp8_blockwise(
    state: dict[str, torch.Tensor], *, block: int = 128, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Inverse of `quantize_fp8_blockwise` up to FP8 rounding: real values, scales dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("_scale_inv"):
            continue
        scale = state.get(scale_key(key))
        out[key] = tensor if scale is None else dequantize_block(tensor, scale, block, dtype)
    return out
