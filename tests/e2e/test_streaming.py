"""`iter_hf`: a live, sharded model's weights streamed under HF names, group by group.

Over 2 gloo ranks at TP=2, EP=2, PP=2 (MTP on the last stage, tied embedding), PP=2 with two
virtual-pipeline chunks per stage, and a bf16 model inside megatron-core's DDP and Float16Module:
every rank receives exactly the checkpoint's tensors, each once, in the same order, bit for bit,
packed or per expert; in buckets no larger than asked; or on one receiving rank only. And in one
process, the memory the stream adds stays within one group plus one bucket on a model more than
ten times larger, while exporting into a dict does not.
"""

from __future__ import annotations

import collections
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from qwen35_bridge.megatron.ranks import run_ranks
from qwen35_bridge.megatron.stream import buckets
from qwen35_codegen import catalog
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import TinyDims, make_checkpoint, unpack_experts
from tests.support.memory import PeakTensorBytes
from tests.support.ranks import save_on_rank, stream_on_rank

MOE = "Qwen/Qwen3.5-35B-A3B"
DENSE = "Qwen/Qwen3.6-27B"
NEXT = "Qwen/Qwen3-Next-80B-A3B-Instruct"
PACKED = {"experts_layout": "packed", "mtp_experts_layout": "packed"}

CASES = {
    "tp2-moe-packed": (MOE, PACKED, dict(tp=2)),
    "tp2-moe-per-expert": (MOE, PACKED, dict(tp=2, experts="per_expert")),
    "ep2-moe-per-expert": (MOE, PACKED, dict(ep=2, experts="per_expert")),
    "ep2-qwen3-next": (NEXT, {"experts_layout": "per_expert"}, dict(ep=2)),
    "pp2-tied-moe": (MOE, {**PACKED, "tie": True}, dict(pp=2)),
    "pp2-vpp2-dense": (DENSE, {"periods": 4}, dict(pp=2, vpp=2)),
    "tp2-ddp-float16-bf16": (MOE, {**PACKED, "dtype": torch.bfloat16}, dict(tp=2, wrapped=True)),
    "tp2-buckets": (MOE, PACKED, dict(tp=2, experts="per_expert", bucket_bytes=64_000)),
    "pp2-receiver-0": (DENSE, {}, dict(pp=2, receiver=0)),
}


def prepare(tmp_path: Path, model_id: str, options: dict) -> tuple[Path, Path, dict]:
    checkpoint = make_checkpoint(
        tmp_path / "hf", catalog.entry(model_id).config, seed=7, text_only=True, **options
    )
    bridges = tmp_path / "bridges"
    bridge_for_checkpoint(checkpoint.path, bridge_dir=bridges, quiet=True)  # generated once
    return checkpoint.path, bridges, checkpoint.state


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rank_streams_exactly_the_checkpoint(case: str, tmp_path: Path) -> None:
    model_id, options, parallel = CASES[case]
    hf_dir, bridges, state = prepare(tmp_path, model_id, options)
    results = run_ranks(partial(stream_on_rank, **parallel), 2, hf_dir, bridges)
    results.sort(key=lambda r: r.rank)
    expected = unpack_experts(state) if parallel.get("experts") == "per_expert" else state
    receivers = [0] if parallel.get("receiver") == 0 else [0, 1]
    for result in results:
        if result.rank not in receivers:
            assert result.names == [] and result.bucket_bytes == []
            continue
        assert len(result.names) == len(set(result.names)), "a tensor came twice"
        assert sorted(result.names) == sorted(expected)
        assert result.mismatched == []
    if receivers == [0, 1]:
        assert results[0].names == results[1].names, "the ranks disagree on the order"
    if parallel.get("vpp"):
        assert results[0].chunks == results[1].chunks == 2
    if parallel.get("experts") == "per_expert":
        assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in results[0].names)
    limit = parallel.get("bucket_bytes")
    if limit:
        largest = max(t.numel() * t.element_size() for t in expected.values())
        sizes = results[0].bucket_bytes
        assert len(sizes) > 3 and all(s <= max(limit, largest) for s in sizes)
        assert sum(sizes) == sum(t.numel() * t.element_size() for t in expected.values())


def test_packed_streaming_refuses_a_per_expert_model(tmp_path: Path) -> None:
    """Qwen3-Next's HF checkpoints are per expert: there is no packed form to promise."""
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    hf_dir, bridges, _ = prepare(tmp_path, NEXT, {"experts_layout": "per_expert"})
    bridge, _, _ = bridge_for_checkpoint(hf_dir, bridge_dir=bridges, quiet=True)
    parallel = init_parallel()
    try:
        model = bridge.build_model(**parallel)
        with pytest.raises(ValueError, match="per expert"):
            next(bridge.iter_hf(model, experts="packed"))
    finally:
        destroy_parallel()


def _bytes(shapes, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in shapes) * dtype.itemsize


def _largest_unit(bridge, per_expert: bool, dtype: torch.dtype) -> int:
    """The most bytes one step of the stream holds: a group's Megatron and HF forms, or, for
    packed experts, the packed tensor and one expert (per expert: one expert, twice)."""
    largest = 0
    for group in bridge.groups:
        megatron = list(group.megatron.values())
        if group.kind == "PackedExperts":
            one = _bytes(megatron[:1], dtype)
            step = 2 * one if per_expert else _bytes(group.hf.values(), dtype) + one
        else:
            step = _bytes(megatron, dtype) + _bytes(group.hf.values(), dtype)
        largest = max(largest, step)
    return largest


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    """A model of ~200 MB whose largest group is ~17 MB (32 packed experts per layer)."""
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    root = tmp_path_factory.mktemp("large")
    dims = TinyDims(
        hidden_size=256,
        head_dim=64,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        intermediate_size=384,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=192,
    )
    checkpoint = make_checkpoint(
        root / "hf",
        catalog.entry(MOE).config,
        seed=2,
        text_only=True,
        experts=32,
        periods=3,
        dims=dims,
        shards=4,
        **PACKED,
    )
    bridge, _, _ = bridge_for_checkpoint(checkpoint.path, bridge_dir=root / "b", quiet=True)
    parallel = init_parallel()
    model = bridge.build_model(**parallel)
    bridge.load_hf(model, checkpoint.path)
    yield bridge, model
    destroy_parallel()


@pytest.mark.parametrize("experts", ["per_expert", "packed"])
def test_the_stream_holds_one_group_plus_one_bucket(large_model, experts: str) -> None:
    bridge, model = large_model
    bucket = 1 << 20
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = _largest_unit(bridge, experts == "per_expert", torch.float32) + bucket
    assert model_bytes >= 10 * bound, (model_bytes, bound)
    with PeakTensorBytes(existing=model.parameters()) as memory:
        collections.deque(bridge.iter_hf(model, experts=experts, bucket_bytes=bucket), maxlen=0)
    assert 0 < memory.peak <= bound, (memory.peak, bound)
    assert memory.live == 0, "the stream keeps tensors after it ends"


def test_exporting_into_a_dict_holds_the_whole_model(large_model) -> None:
    """The negative control: the same measurement sees a whole-model export."""
    bridge, model = large_model
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakTensorBytes(existing=model.parameters()) as memory:
        exported = bridge.export_hf(model)
    assert memory.peak >= model_bytes
    del exported


def test_buckets_never_exceed_the_limit_unless_one_tensor_does() -> None:
    stream = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 10, 50, 5, 5, 30])]
    sizes = [[t.numel() for _, t in b] for b in buckets(iter(stream), bucket_bytes=4 * 25)]
    assert sizes == [[10, 10], [10], [50], [5, 5], [30]]


@pytest.mark.parametrize("parallel", [dict(pp=2), dict(ep=2)], ids=["pp2", "ep2"])
def test_save_hf_writes_the_checkpoint_from_the_stream_on_one_rank(
    parallel: dict, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    hf_dir, bridges, state = prepare(tmp_path, MOE, {**PACKED, "mtp_experts_layout": "per_expert"})
    out = tmp_path / "saved"
    written = run_ranks(partial(save_on_rank, **parallel), 2, hf_dir, bridges, out)
    assert written == [len(state), None]
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1, "the shard limit splits the output"
    saved: dict = {}
    for shard in shards:
        saved |= load_file(shard)
    assert saved.keys() == state.keys()
    for name, tensor in state.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (hf_dir / "config.json").read_text()
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
