"""The interface every checkpoint format is read and written through.

Offline conversion, `verify` and the sharded loaders see a source as a `TensorReader` (an HF or
Megatron safetensors folder, a torch_dist folder, or the FP8 view that dequantises one) and a
safetensors destination as a `TensorWriter`, so a check written once (names, shapes, dtypes)
holds for every format.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from qwen35_bridge.formats.spans import StoredTensor


@runtime_checkable
class TensorReader(Protocol):
    """Named tensors of one checkpoint: metadata without reading data, data on request."""

    directory: Path

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def file(self, name: str) -> str:
        """Where the tensor is stored, for error messages."""
        ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Several tensors, in as few reads as the format allows (a mapping group's sources)."""
        ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `[start, stop)` of a tensor (along its first dimension), reading no more of it
        than the format requires: a part of a group too large to hold whole."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StoringReader(Protocol):
    """A reader that can say where a tensor's bytes lie in its files, so that a tensor a
    conversion only moves is copied file to file without being read (`formats.spans`)."""

    def stored(self, name: str) -> StoredTensor | None:
        """The tensor's bytes in the checkpoint's files, in order; None where they do not lie
        there as one row-major run per part (it is then read)."""
        ...


@runtime_checkable
class TensorWriter(Protocol):
    """A destination tensors stream into one at a time; nothing is visible until `close`."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Drop what was written (the conversion failed)."""
        ...
