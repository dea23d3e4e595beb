"""Tensor dtypes as checkpoint files name them, defined once (no torch needed to read the table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: safetensors dtype name -> (torch dtype attribute, bytes per element).
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

#: What a weight may be stored as (an FP8 release's float8 weights are read dequantised).
WEIGHT_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype name (KeyError if unknown)."""
    return SAFETENSORS_DTYPES[name][1]


def to_torch(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[name][0])


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    attribute = str(dtype).removeprefix("torch.")
    for name, (attr, _) in SAFETENSORS_DTYPES.items():
        if attr == attribute:
            return name
    raise KeyError(f"{dtype} has no safetensors name")


def weight_dtypes() -> tuple[torch.dtype, ...]:
    import torch

    return tuple(getattr(torch, name) for name in WEIGHT_DTYPE_NAMES)
