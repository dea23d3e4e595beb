"""Block-quantised FP8 checkpoints (docs/reference.md section 6): read them dequantised, write them back.

A quantised tensor `X.weight` is float8 (e4m3) with `X.weight_scale_inv` holding one scale per
block of the last two dimensions (partial blocks at the edges); its value is `weight * scale_inv`
over each block. Reading dequantises to a chosen dtype (bf16 by default) and consumes the scales:
a scale without its weight, a float8 weight without its scale, a scale of the wrong shape, or a
float8 weight in a module the config says is not converted, is an error naming the tensor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.safetensors.reader import CheckpointReader

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = (torch.float32, torch.bfloat16)


def scale_name(name: str) -> str:
    """`X.weight` -> `X.weight_scale_inv` (packed experts: `...gate_up_proj_scale_inv`)."""
    return name + SCALE_SUFFIX


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def _per_element(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(
        block[1], dim=-1
    )[..., :cols]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = weight.shape[-2:]
    return (weight.to(torch.float32) * _per_element(scale.to(torch.float32), block, rows, cols)).to(
        dtype
    )


def quantize(
    weight: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale_inv): each block scaled so its largest magnitude is FP8's maximum."""
    rows, cols = weight.shape[-2:]
    tiles = scale_shape(weight.shape, block)[-2:]
    w = weight.to(torch.float32)
    padded = torch.nn.functional.pad(
        w.abs(), (0, tiles[1] * block[1] - cols, 0, tiles[0] * block[0] - rows)
    )
    amax = padded.reshape(*w.shape[:-2], tiles[0], block[0], tiles[1], block[1]).amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (
        (w / _per_element(scale.to(torch.float32), block, rows, cols))
        .clamp(-FP8_MAX, FP8_MAX)
        .to(FP8)
    )
    return q, scale


# A pattern ends at a module boundary: `layers.1` names `layers.1.mlp`, not `layers.11.mlp`.
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def not_converted(name: str, modules: Sequence[str]) -> bool:
    """Whether tensor `name` belongs to a module `modules_to_not_convert` leaves unquantised, by
    transformers' rule (5.24, `should_convert_module`): a pattern matches the module name from
    its start up to a module boundary, also as a regex (`model.layers.*.self_attn`), or as a
    suffix (`lm_head`). A release that quantises only its routed experts lists the rest so."""
    module = name.rsplit(".", 1)[0]
    return any(re.match(rf"(?:{m}){_BOUNDARY}", module) or module.endswith(m) for m in modules)


class DequantizingReader:
    """A CheckpointReader's view in which FP8 weights are plain tensors and scales are consumed."""

    def __init__(
        self,
        reader: CheckpointReader,
        *,
        block: Sequence[int],
        modules_to_not_convert: Sequence[str],
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self._reader = reader
        self.directory = reader.directory
        self._block = (int(block[0]), int(block[1]))
        self._dtype = dtype
        self.quantized: dict[str, str] = {}  # weight -> its scale
        for name in sorted(reader.names()):
            if name.endswith(SCALE_SUFFIX):
                weight = name[: -len(SCALE_SUFFIX)]
                if weight not in reader.names():
                    raise ConversionError(f"{name}: a scale without its weight {weight}")
                continue
            if reader.dtype(name) != FP8:
                continue
            scale = scale_name(name)
            if scale not in reader.names():
                raise ConversionError(f"{name}: float8 weight without its scale {scale}")
            if reader.dtype(scale) not in SCALE_DTYPES:
                raise ConversionError(
                    f"{scale}: dtype {reader.dtype(scale)}; a scale is float32 or bfloat16"
                )
            expected = scale_shape(reader.shape(name), self._block)
            if reader.shape(scale) != expected:
                raise ConversionError(
                    f"{scale}: shape {list(reader.shape(scale))}, expected {list(expected)} for {self._block} blocks of {name}"
                )
            if not_converted(name, modules_to_not_convert):
                raise ConversionError(
                    f"{name}: float8, but its module is in modules_to_not_convert"
                )
            self.quantized[name] = scale
        for name in reader.names():
            if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] not in self.quantized:
                raise ConversionError(
                    f"{name}: a scale for {name[: -len(SCALE_SUFFIX)]}, which is not float8"
                )

    def names(self) -> set[str]:
        return {n for n in self._reader.names() if not n.endswith(SCALE_SUFFIX)}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)

    def file(self, name: str) -> str:
        return self._reader.file(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype if name in self.quantized else self._reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        tensor = self._reader.get(name)
        if name not in self.quantized:
            return tensor
        return dequantize(tensor, self._reader.get(self.quantized[name]), self._block, self._dtype)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in names}

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self.quantized:
            return self._reader.get_rows(name, start, stop)
        return self.get(name)[start:stop]  # dequantised whole: its scales cover blocks of rows

    def close(self) -> None:
        """Nothing to release: the reader underneath is closed by whoever opened it."""
