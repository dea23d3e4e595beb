"""Tensor-parallel split rules: how each Megatron tensor is cut across TP ranks, and re-assembled.

A fused tensor made of sections (GDN in_proj: q, k, v, z, beta, alpha; GLU fc1: gate, up) is cut
section by section, so that rank r holds the r-th slice of every section in order. Cutting such
a tensor contiguously runs but computes the wrong thing (docs/reference.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Split:
    """`dim` None: replicated on every rank. Else cut along `dim`; `sections` is either the sizes of
    the fused sections along `dim`, or a number of equal sections (1: a plain contiguous cut)."""

    dim: int | None
    sections: tuple[int, ...] | int = 1
    name: str = ""

    def __repr__(self) -> str:
        return self.name or f"Split(dim={self.dim}, sections={self.sections})"

    def _sizes(self, length: int) -> list[int]:
        if isinstance(self.sections, int):
            if length % self.sections:
                raise ValueError(f"{length} rows do not divide into {self.sections} equal sections")
            return [length // self.sections] * self.sections
        if sum(self.sections) != length:
            raise ValueError(f"sections {self.sections} do not add up to {length}")
        return list(self.sections)

    def shard(self, tensor: Tensor, rank: int, size: int) -> Tensor:
        """The slice that TP rank `rank` of `size` holds."""
        if self.dim is None or size == 1:
            return tensor
        import torch

        pieces = []
        for section in tensor.split(self._sizes(tensor.shape[self.dim]), dim=self.dim):
            if section.shape[self.dim] % size:
                raise ValueError(
                    f"a section of {section.shape[self.dim]} does not split over {size} ranks"
                )
            pieces.append(section.chunk(size, dim=self.dim)[rank])
        return torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0]

    def merge(self, shards: Sequence[Tensor]) -> Tensor:
        """Inverse of `shard` over all ranks."""
        if self.dim is None or len(shards) == 1:
            return shards[0]
        import torch

        size = len(shards)
        full = sum(s.shape[self.dim] for s in shards)
        local_sizes = [n // size for n in self._sizes(full)]
        per_rank = [s.split(local_sizes, dim=self.dim) for s in shards]
        sections = [
            torch.cat([rank[i] for rank in per_rank], dim=self.dim) for i in range(len(local_sizes))
        ]
        return torch.cat(sections, dim=self.dim)


REPLICATED = Split(None, name="REPLICATED")
COLUMN = Split(0, name="COLUMN")
ROW = Split(1, name="ROW")
VOCAB = Split(0, name="VOCAB")
GLU_ROWS = Split(0, 2, name="GLU_ROWS")


def sections(*sizes: int) -> Split:
    """A fused tensor cut section by section along dim 0 (GDN in_proj and conv1d)."""
    return Split(0, tuple(sizes))
