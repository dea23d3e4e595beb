"""The mapping kinds a generated bridge's table is made of.

A mapping names a family of Megatron tensors (a template with `{i}` for the layer and `{e}` for the
expert), the HF tensors it is made from, the layers (and experts) it covers, and how it is split
across tensor-parallel ranks. `groups()` expands it into concrete groups: the smallest sets of HF
and Megatron tensors that must meet to be converted, in either direction. Conversion code works on
groups only, so every mapping kind is converted, streamed, sharded and checked the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from codegen.runtime import transforms as t
from codegen.runtime.tp import COLUMN, GLU_ROWS, REPLICATED, Split, sections

Tensors = Mapping[str, Tensor]


@dataclass(frozen=True)
class ConvertOptions:
    """Choices a user makes explicitly; the defaults refuse anything inexact."""

    allow_norm_rounding: bool = False


@dataclass(frozen=True)
class Group:
    """Concrete HF and Megatron tensor names that convert into each other as one unit."""

    hf: tuple[str, ...]
    megatron: tuple[str, ...]
    split: Split
    to_megatron: Callable[[Tensors, ConvertOptions], dict[str, Tensor]] = field(repr=False, compare=False)
    to_hf: Callable[[Tensors], dict[str, Tensor]] = field(repr=False, compare=False)


@dataclass(frozen=True)
class MappingBase:
    """Common parts: the Megatron name template and the layers it covers (empty: not per layer)."""

    megatron: str
    layers: tuple[int, ...] = ()

    def _indices(self) -> Iterator[dict[str, int]]:
        if not self.layers:
            yield {}
        for i in self.layers:
            yield {"i": i}

    def groups(self) -> Iterator[Group]:
        for index in self._indices():
            yield from self._groups(index)

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        raise NotImplementedError


def _one_to_one(meg: str, hf: str, split: Split, fwd: Callable[[Tensor], Tensor], back: Callable[[Tensor], Tensor]) -> Group:
    return Group(
        hf=(hf,),
        megatron=(meg,),
        split=split,
        to_megatron=lambda ts, _opts: {meg: fwd(ts[hf])},
        to_hf=lambda ts: {hf: back(ts[meg])},
    )


def _same(x: Tensor) -> Tensor:
    return x


@dataclass(frozen=True)
class Rename(MappingBase):
    """One HF tensor copied unchanged; with `experts`, one per expert (`{e}` in both names)."""

    hf: str = ""
    tp: Split = REPLICATED
    experts: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        for idx in _with_experts(index, self.experts):
            yield _one_to_one(self.megatron.format(**idx), self.hf.format(**idx), self.tp, _same, _same)


@dataclass(frozen=True)
class GatedQKV(MappingBase):
    """HF q_proj (queries and gates interleaved per head), k_proj, v_proj -> Megatron linear_qkv."""

    q: str = ""
    k: str = ""
    v: str = ""
    dims: t.AttentionDims | None = None

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, q, k, v, dims = self.megatron.format(**index), self.q.format(**index), self.k.format(**index), self.v.format(**index), self.dims
        yield Group(
            hf=(q, k, v),
            megatron=(meg,),
            split=COLUMN,  # whole KV groups per rank: the groups are contiguous
            to_megatron=lambda ts, _o: {meg: t.gated_qkv_to_megatron(ts[q], ts[k], ts[v], dims)},
            to_hf=lambda ts: dict(zip((q, k, v), t.gated_qkv_to_hf(ts[meg], dims))),
        )


@dataclass(frozen=True)
class GDNInProj(MappingBase):
    """HF Qwen3.5 in_proj_qkv, in_proj_z, in_proj_b, in_proj_a -> Megatron in_proj."""

    qkv: str = ""
    z: str = ""
    b: str = ""
    a: str = ""
    dims: t.GDNDims | None = None

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg = self.megatron.format(**index)
        names = tuple(n.format(**index) for n in (self.qkv, self.z, self.b, self.a))
        dims = self.dims
        yield Group(
            hf=names,
            megatron=(meg,),
            split=sections(*dims.in_proj_sections),
            to_megatron=lambda ts, _o: {meg: t.gdn_in_proj_to_megatron(*(ts[n] for n in names))},
            to_hf=lambda ts: dict(zip(names, t.gdn_in_proj_to_hf(ts[meg], dims))),
        )


@dataclass(frozen=True)
class GDNInProjGrouped(MappingBase):
    """HF Qwen3-Next in_proj_qkvz and in_proj_ba (grouped per key head) -> Megatron in_proj."""

    qkvz: str = ""
    ba: str = ""
    dims: t.GDNDims | None = None

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, qkvz, ba, dims = self.megatron.format(**index), self.qkvz.format(**index), self.ba.format(**index), self.dims
        yield Group(
            hf=(qkvz, ba),
            megatron=(meg,),
            split=sections(*dims.in_proj_sections),
            to_megatron=lambda ts, _o: {meg: t.gdn_grouped_in_proj_to_megatron(ts[qkvz], ts[ba], dims)},
            to_hf=lambda ts: dict(zip((qkvz, ba), t.gdn_grouped_in_proj_to_hf(ts[meg], dims))),
        )


@dataclass(frozen=True)
class GDNConv1d(MappingBase):
    """The causal conv1d over [q; k; v] channels: copied, but split per section across TP ranks."""

    hf: str = ""
    dims: t.GDNDims | None = None

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        split = sections(*self.dims.conv_sections)
        yield _one_to_one(self.megatron.format(**index), self.hf.format(**index), split, _same, _same)


@dataclass(frozen=True)
class GDNOutNorm(MappingBase):
    """The GDN output norm: HF `w` (plain scale) is Megatron `w - 1` (zero-centred gamma)."""

    hf: str = ""

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, hf = self.megatron.format(**index), self.hf.format(**index)
        yield Group(
            hf=(hf,),
            megatron=(meg,),
            split=REPLICATED,
            to_megatron=lambda ts, o: {meg: t.shift_norm_to_megatron(ts[hf], hf, allow_rounding=o.allow_norm_rounding)},
            to_hf=lambda ts: {hf: t.shift_norm_to_hf(ts[meg])},
        )


@dataclass(frozen=True)
class GLU(MappingBase):
    """HF gate_proj and up_proj -> Megatron linear_fc1 ([gate; up]); per expert with `experts`."""

    gate: str = ""
    up: str = ""
    experts: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        for idx in _with_experts(index, self.experts):
            meg, gate, up = self.megatron.format(**idx), self.gate.format(**idx), self.up.format(**idx)
            yield Group(
                hf=(gate, up),
                megatron=(meg,),
                split=GLU_ROWS,
                to_megatron=lambda ts, _o, meg=meg, gate=gate, up=up: {meg: t.glu_to_megatron(ts[gate], ts[up])},
                to_hf=lambda ts, meg=meg, gate=gate, up=up: dict(zip((gate, up), t.glu_to_hf(ts[meg]))),
            )


@dataclass(frozen=True)
class PackedExperts(MappingBase):
    """One HF tensor holding every expert ([E, ...]) <-> one Megatron tensor per expert (`{e}`)."""

    hf: str = ""
    experts: int = 0
    tp: Split = REPLICATED

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        hf = self.hf.format(**index)
        megs = tuple(self.megatron.format(**index, e=e) for e in range(self.experts))
        yield Group(
            hf=(hf,),
            megatron=megs,
            split=self.tp,
            to_megatron=lambda ts, _o: dict(zip(megs, t.unstack_experts(ts[hf]))),
            to_hf=lambda ts: {hf: t.stack_experts([ts[m] for m in megs])},
        )


@dataclass(frozen=True)
class VisionQKV(MappingBase):
    """Vision attention qkv (weight or bias): HF flat [Q; K; V] -> Megatron per head [q; k; v]."""

    hf: str = ""
    dims: t.VisionDims | None = None

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        dims = self.dims
        yield _one_to_one(
            self.megatron.format(**index),
            self.hf.format(**index),
            COLUMN,
            lambda x: t.vision_qkv_to_megatron(x, dims),
            lambda x: t.vision_qkv_to_hf(x, dims),
        )


def _with_experts(index: dict[str, int], experts: int) -> Iterator[dict[str, int]]:
    if not experts:
        yield index
    for e in range(experts):
        yield {**index, "e": e}
