"""Every transform against a naive reference written from docs/reference.md, its exact inverse, and its TP split."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.mapping import transforms as t
from qwen35_bridge.mapping.splits import COLUMN, GLU_ROWS, REPLICATED, ROW, sections

settings.register_profile("transforms", max_examples=40, deadline=None)
settings.load_profile("transforms")

HIDDEN = 6


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b)
    )


attention_dims = st.builds(
    lambda kv, r, d: t.AttentionDims(heads=kv * r, kv_heads=kv, head_dim=d),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 5),
)
gdn_dims = st.builds(
    lambda nk, r, dk, dv: t.GDNDims(
        key_heads=nk, value_heads=nk * r, key_head_dim=dk, value_head_dim=dv
    ),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
)


def reference_gated_qkv(q, k, v, dims: t.AttentionDims) -> torch.Tensor:
    """docs/reference.md section 4, written as loops: per KV group, its heads' queries, their gates, k, v."""
    d, rows = dims.head_dim, []
    for g in range(dims.kv_heads):
        heads = range(g * dims.group_size, (g + 1) * dims.group_size)
        rows += [q[h * 2 * d : h * 2 * d + d] for h in heads]
        rows += [q[h * 2 * d + d : (h + 1) * 2 * d] for h in heads]
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    return torch.cat(rows)


@given(attention_dims, st.integers(0, 10_000))
def test_gated_qkv_matches_reference_and_inverts(dims, seed):
    d = dims.head_dim
    q, k, v = (
        rand(dims.heads * 2 * d, HIDDEN, seed=seed),
        rand(dims.kv_heads * d, HIDDEN, seed=seed + 1),
        rand(dims.kv_heads * d, HIDDEN, seed=seed + 2),
    )
    qkv = t.gated_qkv_to_megatron(q, k, v, dims)
    assert torch.equal(qkv, reference_gated_qkv(q, k, v, dims))
    back = t.gated_qkv_to_hf(qkv, dims)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@given(gdn_dims, st.integers(0, 10_000))
def test_gdn_in_proj_inverts(dims, seed):
    qk, vd = dims.key_heads * dims.key_head_dim, dims.value_heads * dims.value_head_dim
    parts = [
        rand(2 * qk + vd, HIDDEN, seed=seed),
        rand(vd, HIDDEN, seed=seed + 1),
        rand(dims.value_heads, HIDDEN, seed=seed + 2),
        rand(dims.value_heads, HIDDEN, seed=seed + 3),
    ]
    in_proj = t.gdn_in_proj_to_megatron(*parts)
    assert in_proj.shape[0] == sum(dims.in_proj_sections)
    assert all(torch.equal(a, b) for a, b in zip(t.gdn_in_proj_to_hf(in_proj, dims), parts))


def reference_grouped_to_flat(qkvz, ba, dims: t.GDNDims) -> torch.Tensor:
    """docs/reference.md section 5: Qwen3-Next groups [q_g, k_g, v_g, z_g] and [b_g, a_g] per key head g."""
    dk, dv, r = dims.key_head_dim, dims.value_head_dim, dims.value_heads // dims.key_heads
    width, q, k, v, z, b, a = 2 * dk + 2 * r * dv, [], [], [], [], [], []
    for g in range(dims.key_heads):
        base = g * width
        q.append(qkvz[base : base + dk])
        k.append(qkvz[base + dk : base + 2 * dk])
        v.append(qkvz[base + 2 * dk : base + 2 * dk + r * dv])
        z.append(qkvz[base + 2 * dk + r * dv : base + width])
        b.append(ba[g * 2 * r : g * 2 * r + r])
        a.append(ba[g * 2 * r + r : (g + 1) * 2 * r])
    return torch.cat([torch.cat(x) for x in (q, k, v, z, b, a)])


@given(gdn_dims, st.integers(0, 10_000))
def test_gdn_grouped_in_proj_matches_reference_and_inverts(dims, seed):
    r = dims.value_heads // dims.key_heads
    qkvz = rand(
        dims.key_heads * (2 * dims.key_head_dim + 2 * r * dims.value_head_dim), HIDDEN, seed=seed
    )
    ba = rand(dims.key_heads * 2 * r, HIDDEN, seed=seed + 1)
    in_proj = t.gdn_grouped_in_proj_to_megatron(qkvz, ba, dims)
    assert torch.equal(in_proj, reference_grouped_to_flat(qkvz, ba, dims))
    back_qkvz, back_ba = t.gdn_grouped_in_proj_to_hf(in_proj, dims)
    assert torch.equal(back_qkvz, qkvz) and torch.equal(back_ba, ba)


@given(st.integers(1, 8), st.integers(0, 10_000), st.sampled_from([torch.float32, torch.bfloat16]))
def test_out_norm_shift_is_exact_in_sterbenz_range(n, seed, dtype):
    w = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.5).to(
        dtype
    )  # [0.5, 2]
    shifted = t.shift_norm_to_megatron(w, "w")
    assert torch.equal(shifted, w - 1)
    assert torch.equal(t.shift_norm_to_hf(shifted, "g"), w)


def test_out_norm_shift_refuses_inexact_values():
    w = torch.tensor([1.0, 3.0e-8], dtype=torch.float32)  # 3e-8 - 1 + 1 != 3e-8 in fp32
    try:
        t.shift_norm_to_megatron(w, "model.layers.0.linear_attn.norm.weight")
    except Exception as e:
        assert "model.layers.0.linear_attn.norm.weight" in str(e) and "not exact" in str(e)
    else:
        raise AssertionError("an inexact shift must stop the conversion")
    assert torch.equal(t.shift_norm_to_megatron(w, "w", allow_rounding=True), w - 1)


def test_out_norm_shift_back_refuses_inexact_values():
    """A norm trained in bf16 holds small values; g + 1 cannot hold them exactly."""
    g = torch.tensor([0.0, 0.003], dtype=torch.bfloat16)
    name = "decoder.layers.0.self_attention.out_norm.weight"
    with pytest.raises(ConversionError, match=f"{name}: g \\+ 1 is not exact .* 1 of 2"):
        t.shift_norm_to_hf(g, name)
    assert torch.equal(t.shift_norm_to_hf(g, name, allow_rounding=True), g + 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_out_norm_shift_refuses_non_finite_values_even_when_rounding_is_accepted(bad):
    w = torch.tensor([1.0, bad])
    for shift in (t.shift_norm_to_megatron, t.shift_norm_to_hf):
        with pytest.raises(ConversionError, match="1 of 2 elements are NaN or infinite"):
            shift(w, "w", allow_rounding=True)


@given(st.integers(1, 6), st.integers(0, 10_000))
def test_glu_inverts(rows, seed):
    gate, up = rand(rows, HIDDEN, seed=seed), rand(rows, HIDDEN, seed=seed + 1)
    fc1 = t.glu_to_megatron(gate, up)
    assert torch.equal(fc1[:rows], gate) and torch.equal(fc1[rows:], up)
    assert all(torch.equal(a, b) for a, b in zip(t.glu_to_hf(fc1), (gate, up)))


@given(st.integers(1, 5), st.integers(0, 10_000))
def test_packed_experts_invert(experts, seed):
    packed = rand(experts, 4, HIDDEN, seed=seed)
    per_expert = t.unstack_experts(packed)
    assert all(torch.equal(per_expert[e], packed[e]) for e in range(experts))
    assert torch.equal(t.stack_experts(per_expert), packed)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 10_000))
def test_vision_qkv_matches_reference_and_inverts(heads, head_dim, seed):
    dims = t.VisionDims(heads=heads, hidden=heads * head_dim)
    c = dims.hidden
    for qkv in (rand(3 * c, c, seed=seed), rand(3 * c, seed=seed + 1)):
        reference = torch.cat(
            [
                qkv[part * c + h * head_dim : part * c + (h + 1) * head_dim]
                for h in range(heads)
                for part in range(3)
            ]
        )
        converted = t.vision_qkv_to_megatron(qkv, dims)
        assert torch.equal(converted, reference)
        assert torch.equal(t.vision_qkv_to_hf(converted, dims), qkv)


# -- Tensor-parallel splits ----------------------------------------------------------------------


@given(gdn_dims, st.sampled_from([1, 2, 4]), st.integers(0, 10_000))
def test_gdn_in_proj_split_takes_a_slice_of_every_section(dims, tp, seed):
    if any(s % tp for s in dims.in_proj_sections):
        return
    full = rand(sum(dims.in_proj_sections), HIDDEN, seed=seed)
    split = sections(*dims.in_proj_sections)
    shards = [split.shard(full, r, tp) for r in range(tp)]
    for r, shard in enumerate(shards):
        offset, expected = 0, []
        for size in dims.in_proj_sections:
            expected.append(full[offset + r * size // tp : offset + (r + 1) * size // tp])
            offset += size
        assert torch.equal(shard, torch.cat(expected))
    assert torch.equal(split.merge(shards), full)


@given(
    st.sampled_from([COLUMN, ROW, GLU_ROWS, REPLICATED]),
    st.sampled_from([1, 2, 4]),
    st.integers(0, 10_000),
)
def test_splits_reassemble(split, tp, seed):
    full = rand(8, 8, seed=seed)
    shards = [split.shard(full, r, tp) for r in range(tp)]
    if split is REPLICATED:
        assert all(torch.equal(s, full) for s in shards)
    else:
        assert sum(s.shape[split.dim] for s in shards) == full.shape[split.dim]
    assert torch.equal(split.merge(shards), full)


def test_glu_split_cuts_gate_and_up_separately():
    gate, up = torch.arange(4.0).reshape(4, 1), torch.arange(10.0, 14.0).reshape(4, 1)
    fc1 = t.glu_to_megatron(gate, up)
    assert torch.equal(GLU_ROWS.shard(fc1, 1, 2), torch.cat([gate[2:], up[2:]]))


def test_naive_contiguous_split_of_in_proj_differs():
    """The negative control of docs/reference.md section 5: a plain cut gives other rows than the section cut."""
    dims = t.GDNDims(key_heads=2, value_heads=4, key_head_dim=2, value_head_dim=2)
    full = torch.arange(float(sum(dims.in_proj_sections))).reshape(-1, 1)
    assert not torch.equal(
        COLUMN.shard(full, 0, 2), sections(*dims.in_proj_sections).shard(full, 0, 2)
    )


def test_joined_outputs_go_into_the_memory_given_and_are_the_same() -> None:
    """Under `outputs_from`, every transform that joins tensors writes into the memory it is
    handed (a conversion hands it memory used again), with the same values as without; memory a
    result still holds is never handed out again."""
    from qwen35_bridge.formats.buffers import ReadBuffers

    dims, gdn = t.AttentionDims(heads=4, kv_heads=2, head_dim=3), t.GDNDims(2, 4, 3, 2)
    q, k, v = rand(24, HIDDEN, seed=1), rand(6, HIDDEN, seed=2), rand(6, HIDDEN, seed=3)
    s = gdn.in_proj_sections
    in_proj = [
        rand(s[0] + s[1] + s[2], HIDDEN, seed=4),
        *(rand(n, HIDDEN, seed=5 + n) for n in s[3:]),
    ]
    cases = {
        "gated_qkv_to_megatron": lambda: [t.gated_qkv_to_megatron(q, k, v, dims)],
        "gated_qkv_to_hf": lambda: list(
            t.gated_qkv_to_hf(t.gated_qkv_to_megatron(q, k, v, dims), dims)
        )[:1],
        "gdn_in_proj_to_megatron": lambda: [t.gdn_in_proj_to_megatron(*in_proj)],
        "gdn_in_proj_to_hf": lambda: [t.gdn_in_proj_to_hf(torch.cat(in_proj), gdn)[0]],
        "glu_to_megatron": lambda: [t.glu_to_megatron(q, q + 1)],
        "stack_experts": lambda: [t.stack_experts([q, k.repeat(4, 1)])],
    }
    plain = {name: make() for name, make in cases.items()}
    buffers = ReadBuffers()
    given_out: list[int] = []

    def allocate(shape, dtype):
        tensor = buffers.empty(shape, dtype)
        given_out.append(tensor.untyped_storage().data_ptr())
        return tensor

    with t.outputs_from(allocate):
        for name, make in cases.items():
            given_out.clear()
            (joined,) = make()[-1:]
            assert given_out and joined.untyped_storage().data_ptr() == given_out[-1], name
            assert bit_equal(joined, plain[name][-1]), name
        held = t.glu_to_megatron(q, q)
        again = t.glu_to_megatron(k, k)
        assert again.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
        assert bit_equal(held, torch.cat([q, q]))
    assert t.glu_to_megatron(q, q).untyped_storage().data_ptr() not in given_out  # outside: fresh
