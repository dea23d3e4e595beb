"""Pure tensor transforms between HF and Megatron layouts, each with its exact inverse.

Every function only reorders, concatenates, splits or (for the GDN output norm) shifts by one, so
each inverse reproduces its input bit for bit. Layouts are docs/reference.md sections 3 to 8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping.dims import AttentionDims, GDNDims, VisionDims

# -- Where joined tensors go -----------------------------------------------------------------------

Allocate = Callable[[tuple[int, ...], torch.dtype], Tensor]
_allocate: ContextVar[Allocate | None] = ContextVar("transform_outputs", default=None)


@contextmanager
def outputs_from(allocate: Allocate) -> Iterator[None]:
    """Within this block, a transform that joins tensors (a concatenation, a stack) writes the
    result into `allocate(shape, dtype)` instead of fresh memory.

    Fresh memory costs a page fault per 4 KiB page when first written: converting a 5 GB dense
    checkpoint faulted 0.7 million times, ten times as often as reading and writing it unchanged.
    A conversion passes memory it uses again once no tensor holds it (`ReadBuffers.empty`)."""
    token = _allocate.set(allocate)
    try:
        yield
    finally:
        _allocate.reset(token)


def _joined_into(tensors: Sequence[Tensor], shape: tuple[int, ...]) -> Tensor | None:
    """Where a join of `tensors` of `shape` goes: memory from `outputs_from`, or None (fresh
    memory) outside it or for tensors of mixed dtypes, which torch promotes."""
    allocate = _allocate.get()
    dtype = tensors[0].dtype
    if allocate is None or any(t.dtype != dtype for t in tensors):
        return None
    return allocate(shape, dtype)


def _cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.cat(tensors, dim, out=_joined_into(tensors, tuple(shape)))


def _stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    shape = tensors[0].shape
    return torch.stack(
        tensors, dim, out=_joined_into(tensors, (*shape[:dim], len(tensors), *shape[dim:]))
    )


# -- Gated attention QKV ---------------------------------------------------------------------------


def gated_qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, dims: AttentionDims) -> Tensor:
    """HF q_proj (per head: d query rows, d gate rows), k_proj, v_proj -> Megatron linear_qkv:
    per KV group, the queries of its heads, their gates, its key, its value."""
    g, r, d = dims.kv_heads, dims.group_size, dims.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, r, 2, d, *rest)
    queries = q[:, :, 0].reshape(g, r * d, *rest)
    gates = q[:, :, 1].reshape(g, r * d, *rest)
    return _cat([queries, gates, k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1).reshape(
        g * (2 * r + 2) * d, *rest
    )


def gated_qkv_to_hf(qkv: Tensor, dims: AttentionDims) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `gated_qkv_to_megatron`: (q_proj, k_proj, v_proj)."""
    g, r, d = dims.kv_heads, dims.group_size, dims.head_dim
    rest = qkv.shape[1:]
    queries, gates, k, v = qkv.reshape(g, (2 * r + 2) * d, *rest).split([r * d, r * d, d, d], dim=1)
    q = _stack([queries.reshape(g, r, d, *rest), gates.reshape(g, r, d, *rest)], dim=2)
    return q.reshape(g * r * 2 * d, *rest), k.reshape(g * d, *rest), v.reshape(g * d, *rest)


# -- Gated DeltaNet --------------------------------------------------------------------------------


def gdn_in_proj_to_megatron(qkv: Tensor, z: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """HF Qwen3.5 in_proj_qkv ([q; k; v]), in_proj_z, in_proj_b, in_proj_a -> Megatron in_proj."""
    return _cat([qkv, z, b, a], dim=0)


def gdn_in_proj_to_hf(in_proj: Tensor, dims: GDNDims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of `gdn_in_proj_to_megatron`: (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)."""
    q, k, v, z, b, a = in_proj.split(dims.in_proj_sections, dim=0)
    return _cat([q, k, v]), z, b, a


def gdn_grouped_in_proj_to_megatron(qkvz: Tensor, ba: Tensor, dims: GDNDims) -> Tensor:
    """HF Qwen3-Next in_proj_qkvz / in_proj_ba (grouped per key head) -> Megatron in_proj."""
    nk, dk, dv = dims.key_heads, dims.key_head_dim, dims.value_head_dim
    r = dims.value_heads // nk
    rest = qkvz.shape[1:]
    q, k, v, z = qkvz.reshape(nk, 2 * dk + 2 * r * dv, *rest).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.reshape(nk, 2 * r, *rest).split([r, r], dim=1)
    flat = [t.reshape(-1, *rest) for t in (q, k, v, z, b, a)]
    return _cat(flat, dim=0)


def gdn_grouped_in_proj_to_hf(in_proj: Tensor, dims: GDNDims) -> tuple[Tensor, Tensor]:
    """Inverse of `gdn_grouped_in_proj_to_megatron`: (in_proj_qkvz, in_proj_ba)."""
    nk = dims.key_heads
    rest = in_proj.shape[1:]
    q, k, v, z, b, a = (
        t.reshape(nk, -1, *rest) for t in in_proj.split(dims.in_proj_sections, dim=0)
    )
    qkvz = _cat([q, k, v, z], dim=1).reshape(-1, *rest)
    ba = _cat([b, a], dim=1).reshape(-1, *rest)
    return qkvz, ba


def shift_norm_to_megatron(weight: Tensor, name: str, *, allow_rounding: bool = False) -> Tensor:
    """HF GDN output norm `w` (plain scale) -> Megatron `w - 1` (zero-centred gamma).

    The subtraction must be exact, or exporting back would not give `w`: checked element-wise.
    """
    return _shifted(weight, -1, name, allow_rounding=allow_rounding, what="w - 1")


def shift_norm_to_hf(weight: Tensor, name: str, *, allow_rounding: bool = False) -> Tensor:
    """Inverse of `shift_norm_to_megatron`: Megatron `g` -> HF `g + 1`, checked the same way (a
    norm trained in bf16 near 0 can hold values `g + 1` cannot)."""
    return _shifted(weight, 1, name, allow_rounding=allow_rounding, what="g + 1")


def _shifted(weight: Tensor, by: int, name: str, *, allow_rounding: bool, what: str) -> Tensor:
    if weight.is_floating_point() and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ConversionError(
            f"{name}: {bad} of {weight.numel()} elements are NaN or infinite; not a usable weight"
        )
    shifted = weight + by
    if not allow_rounding and not torch.equal(shifted - by, weight):
        bad = int((shifted - by != weight).sum())
        raise ConversionError(
            f"{name}: {what} is not exact in {weight.dtype} for {bad} of {weight.numel()} elements; "
            "converting would change the weights (pass --accept-norm-rounding to accept the rounding)"
        )
    return shifted


# -- MLP and experts -------------------------------------------------------------------------------


def glu_to_megatron(gate: Tensor, up: Tensor) -> Tensor:
    """HF gate_proj and up_proj -> Megatron linear_fc1 (gate rows, then up rows)."""
    return _cat([gate, up], dim=0)


def glu_to_hf(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `glu_to_megatron`: (gate_proj, up_proj)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def unstack_experts(packed: Tensor) -> list[Tensor]:
    """HF packed experts [E, ...] -> one Megatron tensor per expert (gate_up_proj rows are already
    [gate; up], as Megatron's fc1 wants them; no transpose)."""
    return list(packed.unbind(0))


def stack_experts(experts: list[Tensor]) -> Tensor:
    """Inverse of `unstack_experts`. Experts that already lie one after another in one buffer
    (as read from a stacked checkpoint key) are viewed as the stack instead of copied."""
    first = experts[0]
    step = first.numel()
    if first.is_contiguous() and all(
        e.is_contiguous()
        and e.shape == first.shape
        and e.dtype == first.dtype
        and e.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and e.storage_offset() == first.storage_offset() + i * step
        for i, e in enumerate(experts)
    ):
        return first.as_strided((len(experts), *first.shape), (step, *first.stride()))
    return _stack(experts, dim=0)


# -- Vision ----------------------------------------------------------------------------------------


def vision_qkv_to_megatron(qkv: Tensor, dims: VisionDims) -> Tensor:
    """HF flat [Q; K; V] (weight or bias) -> Megatron per head [q_h; k_h; v_h]."""
    rest = qkv.shape[1:]
    d = dims.hidden // dims.heads
    return qkv.reshape(3, dims.heads, d, *rest).transpose(0, 1).reshape(3 * dims.hidden, *rest)


def vision_qkv_to_hf(qkv: Tensor, dims: VisionDims) -> Tensor:
    """Inverse of `vision_qkv_to_megatron`."""
    rest = qkv.shape[1:]
    d = dims.hidden // dims.heads
    return qkv.reshape(dims.heads, 3, d, *rest).transpose(0, 1).reshape(3 * dims.hidden, *rest)
