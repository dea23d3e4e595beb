"""Groups converted in parts give exactly what the whole group gives; parts respect the memory
budget; the workers' shares of the groups are balanced and in order; a tensor written in parts
must arrive in order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.safetensors.writer import Planned, StreamingWriter
from qwen35_bridge.mapping.kinds import ConvertOptions, PackedExperts, Rename
from qwen35_bridge.offline import group_parts
from qwen35_bridge.workers import shares


class _Shapes:
    """What group_parts asks a reader: dtypes (every tensor bf16 here)."""

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_packed_experts_in_parts_equal_the_whole(step: int) -> None:
    mapping = PackedExperts(
        "decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}",
        layers=(0,),
        hf="model.layers.{i}.mlp.experts.gate_up_proj",
        shape=(7, 6, 4),
    )
    (group,) = mapping.groups()
    packed = _random((7, 6, 4), seed=1)
    whole = group.to_megatron({"model.layers.0.mlp.experts.gate_up_proj": packed}, ConvertOptions())
    parts = [group.part(e, min(e + step, 7)) for e in range(0, 7, step)]
    pieces = {}
    for part in parts:
        ((name, (start, stop)),) = part.hf.items()
        pieces |= part.to_megatron({name: packed[start:stop]})
    assert pieces.keys() == whole.keys()
    assert all(torch.equal(pieces[n], whole[n]) for n in whole)
    back = torch.cat([part.to_hf({m: whole[m] for m in part.megatron})[name] for part in parts])
    assert torch.equal(back, packed)


def test_a_copied_tensor_in_row_parts_equals_the_whole() -> None:
    (group,) = Rename("embedding.word_embeddings.weight", hf="embed", shape=(10, 3)).groups()
    table = _random((10, 3), seed=2)
    rows = [group.part(a, min(a + 4, 10)) for a in range(0, 10, 4)]
    joined = torch.cat(
        [
            p.to_megatron({"embed": table[slice(*p.hf["embed"])]})[
                "embedding.word_embeddings.weight"
            ]
            for p in rows
        ]
    )
    assert torch.equal(joined, table)
    assert [p.megatron["embedding.word_embeddings.weight"] for p in rows] == [
        (0, 4),
        (4, 8),
        (8, 10),
    ]


@pytest.mark.parametrize("budget", [1, 100, 200, 1000, 10**9])
def test_parts_hold_at_most_the_budget_or_one_row(budget: int) -> None:
    (group,) = PackedExperts(
        "x.weight{e}", hf="packed", shape=(8, 5, 5)
    ).groups()  # 8 experts of 50 bytes
    parts = group_parts(group, _Shapes(), "hf", budget)
    if budget >= 8 * 50:
        assert parts is None  # fits: converted whole
        return
    ranges = [p.hf["packed"] for p in parts]
    assert ranges[0][0] == 0 and ranges[-1][1] == 8
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all((stop - start) * 50 <= max(budget, 50) for start, stop in ranges)


def test_a_group_that_cannot_be_split_is_converted_whole() -> None:
    from qwen35_bridge.mapping.kinds import GLU

    (group,) = GLU("fc1", gate="g", up="u", shape=(6, 4)).groups()
    assert group_parts(group, _Shapes(), "hf", 1) is None


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_shares_hold_every_item_once_in_order_and_balanced(workers: int) -> None:
    sizes = [5, 1, 1, 9, 2, 2, 2, 30, 1, 4, 4, 4]
    runs = shares(sizes, workers)
    assert len(runs) == workers
    assert sorted(i for run in runs for i in run) == list(range(len(sizes)))
    assert all(run == sorted(run) for run in runs)
    loads = [sum(sizes[i] for i in run) for run in runs]
    # no share exceeds another by more than one item
    assert max(loads) - min(loads) <= max(sizes), loads


def test_large_groups_between_small_ones_are_shared_evenly() -> None:
    # An MoE checkpoint's groups in table order: embedding, then per layer attention, norms and
    # a large packed expert group, then the output layer. Cut in order, two workers got 1180 and
    # 1558 MB; dealt largest first, they differ by at most the largest small group.
    small, experts = [30, 2, 8, 2, 16], 436
    sizes = [134] + [s for _ in range(5) for s in [*small, experts]] + [134]
    loads = sorted(sum(sizes[i] for i in run) for run in shares(sizes, 2))
    assert loads[1] - loads[0] <= 30, loads
    assert shares(sizes, 1) == [list(range(len(sizes)))]


def test_a_tensor_written_in_parts_must_come_in_order(tmp_path: Path) -> None:
    planned = [Planned("a", torch.float32, (4, 2)), Planned("b", torch.float32, (2,))]
    writer = StreamingWriter(tmp_path, [planned])
    writer.write("a", torch.zeros(2, 2), rows=(0, 2))
    with pytest.raises(
        ConversionError, match="at row 3, planned torch.float32 \\[1, 2\\] at row 2"
    ):
        writer.write("a", torch.zeros(1, 2), rows=(3, 4))
    writer.write("a", torch.ones(2, 2), rows=(2, 4))
    with pytest.raises(ConversionError, match="b: planned but never written"):
        writer.close()
    writer.write("b", torch.ones(2))
    writer.close()
    from safetensors.torch import load_file

    written = load_file(tmp_path / "model.safetensors")
    assert torch.equal(written["a"], torch.cat([torch.zeros(2, 2), torch.ones(2, 2)]))
    assert math.prod(written["b"].shape) == 2


def test_a_per_layer_mapping_of_no_layers_has_no_groups() -> None:
    """A model with no layer of a kind (no GDN layer, say) gives that kind's mappings no groups."""
    assert (
        list(Rename("decoder.layers.{i}.x.weight", hf="model.layers.{i}.x", shape=(2,)).groups())
        == []
    )
    assert len(list(Rename("final.weight", hf="norm.weight", shape=(2,)).groups())) == 1
