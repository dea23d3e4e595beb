"""The mapping kinds a generated bridge's table is made of.

A mapping names a family of Megatron tensors (a template with `{i}` for the layer and `{e}` for the
expert), the HF tensors it is made from, their shapes, the layers (and experts) it covers, and how
the Megatron tensor is split across tensor-parallel ranks. `groups()` expands it into concrete
groups: the smallest sets of HF and Megatron tensors that must meet to be converted, in either
direction. Conversion code works on groups only, so every mapping kind is converted, streamed,
sharded and checked the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from qwen35_bridge.mapping import dims as d
from qwen35_bridge.mapping.splits import COLUMN, GLU_ROWS, REPLICATED, Split, sections

if TYPE_CHECKING:
    from torch import Tensor

Tensors = Mapping[str, "Tensor"]
Shape = tuple[int, ...]


def _t():
    """The tensor functions, imported on first use: reading or expanding a table needs no torch."""
    from qwen35_bridge.mapping import transforms

    return transforms


@dataclass(frozen=True)
class ConvertOptions:
    """Choices a user makes explicitly; the defaults refuse anything inexact."""

    allow_norm_rounding: bool = False


Rows = tuple[int, int]


@dataclass(frozen=True)
class Part:
    """Rows `[start, stop)` of a group, which convert on their own: the rows of each tensor they
    touch (all of a tensor's rows when they are all of it), and the conversion of those rows
    (plain functions of the tensors' row slices, keyed by the tensors' names)."""

    hf: dict[str, Rows]
    megatron: dict[str, Rows]
    to_megatron: Callable[[Tensors], dict[str, Tensor]] = field(repr=False, compare=False)
    to_hf: Callable[[Tensors], dict[str, Tensor]] = field(repr=False, compare=False)


#: Rows of named tensors, one after another (rows None: all of the tensor).
Pieces = tuple[tuple[str, "Rows | None"], ...]


@dataclass(frozen=True)
class Copies:
    """A group that converts by moving rows alone: each target tensor, in each direction, as the
    source tensors' rows its bytes are, in order. A conversion can then copy those bytes from
    file to file without reading them (`formats.spans`). A kind gives the Megatron side
    (`megatron_rows`, made when first asked for: a large model has thousands of groups); the HF
    side is its inverse. A test holds both against the group's own conversion functions
    (docs/reference.md section 14)."""

    megatron_rows: Callable[[], dict[str, Pieces]] = field(repr=False, compare=False)
    hf_shapes: dict[str, Shape]
    megatron_shapes: dict[str, Shape]

    @cached_property
    def to_megatron(self) -> dict[str, Pieces]:
        return {t: _merged(p, self.hf_shapes) for t, p in self.megatron_rows().items()}

    @cached_property
    def to_hf(self) -> dict[str, Pieces]:
        return _inverse(self.to_megatron, self.hf_shapes, self.megatron_shapes)


@dataclass(frozen=True)
class Group:
    """Concrete HF and Megatron tensors (names and shapes) that convert into each other as a unit.

    A group whose tensors are stacks of rows that convert independently (a copied tensor's rows,
    a packed expert tensor's experts) says how many (`rows`) and gives `part(start, stop)`: a
    conversion can then stream it in parts of bounded size instead of holding all of it."""

    hf: dict[str, Shape]
    megatron: dict[str, Shape]
    split: Split
    kind: str
    to_megatron: Callable[[Tensors, ConvertOptions], dict[str, Tensor]] = field(
        repr=False, compare=False
    )
    to_hf: Callable[[Tensors, ConvertOptions], dict[str, Tensor]] = field(repr=False, compare=False)
    rows: int = 0  # 0: converted only whole
    part: Callable[[int, int], Part] | None = field(default=None, repr=False, compare=False)
    copies: Copies | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class MappingBase:
    """Common parts: the Megatron name template and the layers it covers (empty: not per layer).

    `{i}` in a name is the layer. A table for HybridModel, whose decoder numbers each logical
    layer's mixer and MLP separately, gives `megatron_layers` too: the Megatron name then carries
    `{j}`, the physical layer of logical layer `layers[k]` being `megatron_layers[k]`, while the
    HF name keeps `{i}` (docs/reference.md section 12)."""

    megatron: str
    layers: tuple[int, ...] = ()
    megatron_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        numbered = bool(self.megatron_layers)
        if numbered and len(self.megatron_layers) != len(self.layers):
            raise ValueError(
                f"{self.megatron}: {len(self.layers)} layers but "
                f"{len(self.megatron_layers)} megatron_layers"
            )
        if numbered and ("{j}" not in self.megatron or "{i}" in self.megatron):
            raise ValueError(
                f"{self.megatron}: with megatron_layers the Megatron name numbers its layer {{j}}"
            )
        if not numbered and "{j}" in self.megatron:
            raise ValueError(f"{self.megatron}: {{j}} needs megatron_layers")

    def groups(self) -> Iterator[Group]:
        if not self.layers and ("{i}" in self.megatron or "{j}" in self.megatron):
            return  # a per-layer mapping of a kind of layer the model has none of
        if self.megatron_layers:
            indices = [{"i": i, "j": j} for i, j in zip(self.layers, self.megatron_layers)]
        else:
            indices = [{"i": i} for i in self.layers]
        for index in indices or [{}]:
            yield from self._groups(index)

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        raise NotImplementedError

    def _group(
        self,
        hf: dict[str, Shape],
        megatron: dict[str, Shape],
        split: Split,
        to_megatron,
        to_hf,
        rows: int = 0,
        part: Callable[[int, int], Part] | None = None,
        copies: Copies | None = None,
    ) -> Group:
        return Group(
            hf, megatron, split, type(self).__name__, to_megatron, to_hf, rows, part, copies
        )


def _all_rows(shape: Shape) -> Rows:
    return (0, shape[0] if shape else 1)


def _inverse(
    plan: dict[str, Pieces], sources: dict[str, Shape], targets: dict[str, Shape]
) -> dict[str, Pieces]:
    """Each source tensor of `plan` as the rows of its targets that hold its rows, in order."""
    held: dict[str, list[tuple[int, str, int, int]]] = {name: [] for name in sources}
    for target, pieces in plan.items():
        at = 0  # elements into the target
        for name, rows in pieces:
            start, stop = rows or _all_rows(sources[name])
            count = (stop - start) * math.prod(sources[name][1:])
            held[name].append((start, target, at, at + count))
            at += count
    inverse = {}
    for name, found in held.items():
        pieces = []
        for _start, target, begin, end in sorted(found):
            size = math.prod(targets[target][1:])
            if begin % size or end % size:
                raise ValueError(f"{name}: its rows are not whole rows of {target}")
            pieces.append((target, (begin // size, end // size)))
        inverse[name] = _merged(tuple(pieces), targets)
    return inverse


def _merged(pieces: Pieces, shapes: dict[str, Shape]) -> Pieces:
    """Pieces with rows that follow on in one tensor joined; all of a tensor's rows: None."""
    out: list[tuple[str, Rows]] = []
    for name, rows in pieces:
        rows = rows or _all_rows(shapes[name])
        if out and out[-1][0] == name and out[-1][1][1] == rows[0]:
            rows = (out.pop()[1][0], rows[1])
        out.append((name, rows))
    return tuple((n, None if r == _all_rows(shapes[n]) else r) for n, r in out)


def _renamed(hf: str, megatron: str, shape: Shape) -> Copies:
    return Copies(lambda: {megatron: ((hf, None),)}, {hf: shape}, {megatron: shape})


def _glu_copies(meg: str, gate: str, up: str, shape: Shape) -> Copies:
    """fc1 is gate_proj's rows, then up_proj's."""
    rows, cols = shape
    return Copies(
        lambda: {meg: ((gate, None), (up, None))}, {gate: shape, up: shape}, {meg: (2 * rows, cols)}
    )


def _with_experts(index: dict[str, int], experts: int) -> Iterator[dict[str, int]]:
    if not experts:
        yield index
    for e in range(experts):
        yield {**index, "e": e}


@dataclass(frozen=True)
class Rename(MappingBase):
    """One HF tensor copied unchanged; with `experts`, one per expert (`{e}` in both names)."""

    hf: str = ""
    shape: Shape = ()
    tp: Split = REPLICATED
    experts: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        for idx in _with_experts(index, self.experts):
            meg, hf = self.megatron.format(**idx), self.hf.format(**idx)
            yield self._group(
                {hf: self.shape},
                {meg: self.shape},
                self.tp,
                lambda ts, _o, meg=meg, hf=hf: {meg: ts[hf]},
                lambda ts, _o, meg=meg, hf=hf: {hf: ts[meg]},
                rows=self.shape[0] if self.shape else 0,
                part=lambda start, stop, meg=meg, hf=hf: Part(
                    {hf: (start, stop)},
                    {meg: (start, stop)},
                    lambda ts: {meg: ts[hf]},
                    lambda ts: {hf: ts[meg]},
                ),
                copies=_renamed(hf, meg, self.shape),
            )


@dataclass(frozen=True)
class GatedQKV(MappingBase):
    """HF q_proj (queries and gates interleaved per head), k_proj, v_proj -> Megatron linear_qkv."""

    q: str = ""
    k: str = ""
    v: str = ""
    dims: d.AttentionDims = d.AttentionDims(1, 1, 1)
    hidden: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, q, k, v = (n.format(**index) for n in (self.megatron, self.q, self.k, self.v))
        d, dims = self.dims, self.dims
        hf = {
            q: (d.heads * 2 * d.head_dim, self.hidden),
            k: (d.kv_heads * d.head_dim, self.hidden),
            v: (d.kv_heads * d.head_dim, self.hidden),
        }
        rows = d.kv_heads * (2 * d.group_size + 2) * d.head_dim
        yield self._group(
            hf,
            {meg: (rows, self.hidden)},
            COLUMN,  # whole KV groups per rank: each group's rows are contiguous
            lambda ts, _o: {meg: _t().gated_qkv_to_megatron(ts[q], ts[k], ts[v], dims)},
            lambda ts, _o: dict(zip((q, k, v), _t().gated_qkv_to_hf(ts[meg], dims))),
            copies=Copies(
                lambda: {meg: _gated_qkv_rows(q, k, v, dims)}, hf, {meg: (rows, self.hidden)}
            ),
        )


def _gated_qkv_rows(q: str, k: str, v: str, dims: d.AttentionDims) -> Pieces:
    """Megatron linear_qkv's rows as HF rows: per KV group, each head's query rows (the first
    half of its q_proj rows), then each head's gate rows, then the group's key and value."""
    r, hd = dims.group_size, dims.head_dim
    pieces: list[tuple[str, Rows | None]] = []
    for group in range(dims.kv_heads):
        heads = range(group * r, (group + 1) * r)
        pieces += [(q, (2 * h * hd, (2 * h + 1) * hd)) for h in heads]
        pieces += [(q, ((2 * h + 1) * hd, (2 * h + 2) * hd)) for h in heads]
        pieces += [(k, (group * hd, (group + 1) * hd)), (v, (group * hd, (group + 1) * hd))]
    return tuple(pieces)


@dataclass(frozen=True)
class GDNInProj(MappingBase):
    """HF Qwen3.5 in_proj_qkv, in_proj_z, in_proj_b, in_proj_a -> Megatron in_proj."""

    qkv: str = ""
    z: str = ""
    b: str = ""
    a: str = ""
    dims: d.GDNDims = d.GDNDims(1, 1, 1, 1)
    hidden: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg = self.megatron.format(**index)
        names = tuple(n.format(**index) for n in (self.qkv, self.z, self.b, self.a))
        dims, s = self.dims, self.dims.in_proj_sections
        rows = (s[0] + s[1] + s[2], s[3], s[4], s[5])
        yield self._group(
            {n: (r, self.hidden) for n, r in zip(names, rows)},
            {meg: (sum(s), self.hidden)},
            sections(*s),
            lambda ts, _o: {meg: _t().gdn_in_proj_to_megatron(*(ts[n] for n in names))},
            lambda ts, _o: dict(zip(names, _t().gdn_in_proj_to_hf(ts[meg], dims))),
            copies=Copies(
                lambda: {meg: tuple((n, None) for n in names)},
                {n: (r, self.hidden) for n, r in zip(names, rows)},
                {meg: (sum(s), self.hidden)},
            ),
        )


@dataclass(frozen=True)
class GDNInProjGrouped(MappingBase):
    """HF Qwen3-Next in_proj_qkvz and in_proj_ba (grouped per key head) -> Megatron in_proj."""

    qkvz: str = ""
    ba: str = ""
    dims: d.GDNDims = d.GDNDims(1, 1, 1, 1)
    hidden: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, qkvz, ba = (n.format(**index) for n in (self.megatron, self.qkvz, self.ba))
        dims, s = self.dims, self.dims.in_proj_sections
        yield self._group(
            {qkvz: (s[0] + s[1] + s[2] + s[3], self.hidden), ba: (s[4] + s[5], self.hidden)},
            {meg: (sum(s), self.hidden)},
            sections(*s),
            lambda ts, _o: {meg: _t().gdn_grouped_in_proj_to_megatron(ts[qkvz], ts[ba], dims)},
            lambda ts, _o: dict(zip((qkvz, ba), _t().gdn_grouped_in_proj_to_hf(ts[meg], dims))),
            copies=Copies(
                lambda: {meg: _grouped_in_proj_rows(qkvz, ba, dims)},
                {qkvz: (s[0] + s[1] + s[2] + s[3], self.hidden), ba: (s[4] + s[5], self.hidden)},
                {meg: (sum(s), self.hidden)},
            ),
        )


def _grouped_in_proj_rows(qkvz: str, ba: str, dims: d.GDNDims) -> Pieces:
    """Megatron in_proj's rows as HF rows: its sections q, k, v, z, beta, alpha, each the
    section's rows of every key head in turn (HF keeps a key head's q, k, v, z together, and its
    beta, alpha)."""
    dk, dv, r = dims.key_head_dim, dims.value_head_dim, dims.value_heads // dims.key_heads
    width = 2 * dk + 2 * r * dv  # qkvz rows per key head
    heads = range(dims.key_heads)
    starts_and_sizes = [  # (tensor, rows per head, offset in the head's rows, section size)
        (qkvz, width, 0, dk),
        (qkvz, width, dk, dk),
        (qkvz, width, 2 * dk, r * dv),
        (qkvz, width, 2 * dk + r * dv, r * dv),
        (ba, 2 * r, 0, r),
        (ba, 2 * r, r, r),
    ]
    return tuple(
        (name, (h * per_head + offset, h * per_head + offset + size))
        for name, per_head, offset, size in starts_and_sizes
        for h in heads
    )


@dataclass(frozen=True)
class GDNConv1d(MappingBase):
    """The causal conv1d over [q; k; v] channels: copied, but split per section across TP ranks."""

    hf: str = ""
    dims: d.GDNDims = d.GDNDims(1, 1, 1, 1)
    kernel: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, hf = self.megatron.format(**index), self.hf.format(**index)
        shape = (sum(self.dims.conv_sections), 1, self.kernel)
        yield self._group(
            {hf: shape},
            {meg: shape},
            sections(*self.dims.conv_sections),
            lambda ts, _o: {meg: ts[hf]},
            lambda ts, _o: {hf: ts[meg]},
            copies=_renamed(hf, meg, shape),
        )


@dataclass(frozen=True)
class GDNOutNorm(MappingBase):
    """The GDN output norm: HF `w` (plain scale) is Megatron `w - 1` (zero-centred gamma)."""

    hf: str = ""
    shape: Shape = ()

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, hf = self.megatron.format(**index), self.hf.format(**index)
        yield self._group(
            {hf: self.shape},
            {meg: self.shape},
            REPLICATED,
            lambda ts, o: {
                meg: _t().shift_norm_to_megatron(ts[hf], hf, allow_rounding=o.allow_norm_rounding)
            },
            lambda ts, o: {
                hf: _t().shift_norm_to_hf(ts[meg], meg, allow_rounding=o.allow_norm_rounding)
            },
        )


@dataclass(frozen=True)
class GLU(MappingBase):
    """HF gate_proj and up_proj, each of `shape` -> Megatron linear_fc1 ([gate; up]); per expert
    with `experts`."""

    gate: str = ""
    up: str = ""
    shape: Shape = ()
    experts: int = 0

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        rows, cols = self.shape
        for idx in _with_experts(index, self.experts):
            meg, gate, up = (n.format(**idx) for n in (self.megatron, self.gate, self.up))
            yield self._group(
                {gate: self.shape, up: self.shape},
                {meg: (2 * rows, cols)},
                GLU_ROWS,
                lambda ts, _o, meg=meg, gate=gate, up=up: {
                    meg: _t().glu_to_megatron(ts[gate], ts[up])
                },
                lambda ts, _o, meg=meg, gate=gate, up=up: dict(
                    zip((gate, up), _t().glu_to_hf(ts[meg]))
                ),
                copies=_glu_copies(meg, gate, up, self.shape),
            )


@dataclass(frozen=True)
class PackedExperts(MappingBase):
    """One HF tensor of `shape` holding every expert ([E, ...]) <-> one Megatron tensor per expert
    (`{e}`). The packed gate_up_proj rows are [gate; up] already, as Megatron's fc1 wants them."""

    hf: str = ""
    shape: Shape = ()
    tp: Split = REPLICATED

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        hf = self.hf.format(**index)
        experts, *inner = self.shape
        megs = tuple(self.megatron.format(**index, e=e) for e in range(experts))

        def part(start: int, stop: int) -> Part:  # experts [start, stop)
            some = megs[start:stop]
            return Part(
                {hf: (start, stop)},
                {m: (0, inner[0]) for m in some},
                lambda ts: dict(zip(some, _t().unstack_experts(ts[hf]))),
                lambda ts: {hf: _t().stack_experts([ts[m] for m in some])},
            )

        yield self._group(
            {hf: self.shape},
            {m: tuple(inner) for m in megs},
            self.tp,
            lambda ts, _o: dict(zip(megs, _t().unstack_experts(ts[hf]))),
            lambda ts, _o: {hf: _t().stack_experts([ts[m] for m in megs])},
            rows=experts,
            part=part,
            copies=Copies(
                lambda: {m: ((hf, (e, e + 1)),) for e, m in enumerate(megs)},
                {hf: self.shape},
                {m: tuple(inner) for m in megs},
            ),
        )


@dataclass(frozen=True)
class VisionQKV(MappingBase):
    """Vision attention qkv (weight or bias): HF flat [Q; K; V] -> Megatron per head [q; k; v]."""

    hf: str = ""
    dims: d.VisionDims = d.VisionDims(1, 1)
    shape: Shape = ()

    def _groups(self, index: dict[str, int]) -> Iterator[Group]:
        meg, hf, dims = self.megatron.format(**index), self.hf.format(**index), self.dims
        yield self._group(
            {hf: self.shape},
            {meg: self.shape},
            COLUMN,  # whole heads per rank
            lambda ts, _o: {meg: _t().vision_qkv_to_megatron(ts[hf], dims)},
            lambda ts, _o: {hf: _t().vision_qkv_to_hf(ts[meg], dims)},
            copies=Copies(
                lambda: {meg: _vision_qkv_rows(hf, dims)}, {hf: self.shape}, {meg: self.shape}
            ),
        )


def _vision_qkv_rows(hf: str, dims: d.VisionDims) -> Pieces:
    """Megatron's per-head [q; k; v] rows as rows of HF's [Q; K; V]."""
    hd = dims.hidden // dims.heads
    return tuple(
        (hf, (part * dims.hidden + h * hd, part * dims.hidden + (h + 1) * hd))
        for h in range(dims.heads)
        for part in range(3)
    )
