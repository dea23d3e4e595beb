"""Real conversions, on CPU, for every variant: HF checkpoint -> `codegen convert` -> a real
megatron-core model -> logits and MTP logits equal HF's -> export -> bit-identical HF tensors.

Every tiny checkpoint is derived from a real catalog config with every parameter random; the
sequence is longer than GDN's chunk (64) so the chunked delta rule spans two chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import TinyCheckpoint, make_checkpoint, reference_mtp_logits

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

TOLERANCE = 1e-4
SEQUENCE = 80


@dataclass(frozen=True)
class Variant:
    model_id: str
    options: dict[str, Any] = field(default_factory=dict)


VARIANTS = {
    "dense-text": Variant("Qwen/Qwen3.6-27B", {"text_only": True, "text_prefix": "model"}),
    "moe-text": Variant(
        "Qwen/Qwen3.5-35B-A3B",
        {
            "text_only": True,
            "text_prefix": "model.language_model",
            "experts_layout": "packed",
            "mtp_experts_layout": "per_expert",
        },
    ),
    "dense-vl": Variant("Qwen/Qwen3.6-27B"),
    "moe-vl-mtp-per-expert": Variant(
        "Qwen/Qwen3.5-35B-A3B", {"experts_layout": "packed", "mtp_experts_layout": "per_expert"}
    ),
    "moe-vl-mtp-packed": Variant(
        "Qwen/Qwen3.5-35B-A3B", {"experts_layout": "packed", "mtp_experts_layout": "packed"}
    ),
    "qwen3-next": Variant(
        "Qwen/Qwen3-Next-80B-A3B-Instruct",
        {
            "experts_layout": "per_expert",
            "mtp_experts_layout": "per_expert",
            "mtp_in_separate_shard": True,
        },
    ),
    "tied": Variant("Qwen/Qwen3.5-4B"),
    # Qwen3.8: Qwen3_5MoeForCausalLM with a flat config (weights under model.), carrying
    # output_gate_type "swish" and mtp_use_dedicated_embeddings false.
    "qwen3.8-flat-moe": Variant(
        "Qwen/Qwen3.8-2.4T-A95B", {"experts_layout": "packed", "mtp_experts_layout": "packed"}
    ),
}


@dataclass
class Converted:
    checkpoint: TinyCheckpoint
    megatron_dir: Path
    bridge: Any
    spec: Any


def convert(tmp: Path, variant: Variant, seed: int = 7) -> Converted:
    checkpoint = make_checkpoint(
        tmp / "hf", catalog.entry(variant.model_id).config, seed=seed, **variant.options
    )
    bridges = tmp / "bridges"
    code = main(
        [
            "convert",
            "hf-to-megatron",
            str(checkpoint.path),
            str(tmp / "megatron"),
            "--bridge-dir",
            str(bridges),
            "--quiet",
        ]
    )
    assert code == 0
    bridge, spec, _ = bridge_for_checkpoint(checkpoint.path, bridge_dir=bridges, quiet=True)
    return Converted(checkpoint, tmp / "megatron", bridge, spec)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory) -> Converted:
    return convert(tmp_path_factory.mktemp(request.param), VARIANTS[request.param])


@pytest.fixture
def parallel_state():
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    yield init_parallel()
    destroy_parallel()


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQUENCE), generator=torch.Generator().manual_seed(seed))


def hf_logits(checkpoint: TinyCheckpoint, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = checkpoint.model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, reference_mtp_logits(model, checkpoint.mtp, ids)


def test_megatron_keys_are_exactly_the_models_parameters(
    converted: Converted, parallel_state
) -> None:
    from qwen35_bridge.megatron.live import global_parameters

    model = converted.bridge.build_model(**parallel_state)
    prefix = converted.bridge.megatron_prefix
    parameters = set(global_parameters(model, prefix))
    state_keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert len(parameters) == len(state_keys)
    with CheckpointReader(converted.megatron_dir) as reader:
        language_model = {k for k in reader.names() if k.startswith(prefix)}
        vision = reader.names() - language_model
    assert language_model == parameters, (
        sorted(language_model - parameters)[:3],
        sorted(parameters - language_model)[:3],
    )
    assert (
        all(k.startswith("vision_model.") for k in vision) and bool(vision) == converted.spec.is_vl
    )


def test_logits_and_mtp_logits_equal_hf(converted: Converted, parallel_state) -> None:
    from qwen35_bridge.megatron.gpt import forward_logits

    model = converted.bridge.build_model(**parallel_state)
    converted.bridge.load_megatron(model, converted.megatron_dir, language_model_only=True)
    ids = tokens(converted.spec.vocab_size)
    logits, mtp = forward_logits(model, ids)
    expected, expected_mtp = hf_logits(converted.checkpoint, ids)
    assert (logits - expected).abs().max().item() <= TOLERANCE
    assert len(mtp) == converted.spec.mtp_layers == 1
    assert (mtp[0] - expected_mtp).abs().max().item() <= TOLERANCE


def test_loading_hf_directly_equals_loading_the_converted_files(
    converted: Converted, parallel_state
) -> None:
    direct = converted.bridge.build_model(**parallel_state)
    converted.bridge.load_hf(direct, converted.checkpoint.path, language_model_only=True)
    from_files = converted.bridge.build_model(**parallel_state)
    converted.bridge.load_megatron(from_files, converted.megatron_dir, language_model_only=True)
    for (name, a), (_, b) in zip(direct.named_parameters(), from_files.named_parameters()):
        assert torch.equal(a, b), name


def test_live_export_is_bit_identical(converted: Converted, parallel_state) -> None:
    model = converted.bridge.build_model(**parallel_state)
    converted.bridge.load_hf(model, converted.checkpoint.path, language_model_only=True)
    exported = converted.bridge.export_hf(model, language_model_only=True)
    language_model = {
        k: v for k, v in converted.checkpoint.state.items() if not k.startswith("model.visual.")
    }
    assert set(exported) == set(language_model)
    for name, tensor in language_model.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def test_a_vl_bridge_never_leaves_its_vision_tower_out_unasked(
    converted: Converted, parallel_state
) -> None:
    """A VL bridge's language model built alone has no place for the vision tower: loading into it
    or exporting from it stops, naming both ways on, unless language_model_only=True says so."""
    bridge, model = converted.bridge, converted.bridge.build_model(**parallel_state)
    calls = {
        "load_hf": lambda: bridge.load_hf(model, converted.checkpoint.path),
        "load_megatron": lambda: bridge.load_megatron(model, converted.megatron_dir),
        "export_hf": lambda: bridge.export_hf(model),
        "export_megatron": lambda: bridge.export_megatron(model),
    }
    for name, call in calls.items():
        if converted.spec.is_vl:
            with pytest.raises(ConversionError, match="no vision tower") as error:
                call()
            assert "build_vl_model()" in str(error.value), name
            assert "language_model_only=True" in str(error.value), name
        else:
            call()


def test_round_trip_on_disk_is_bit_identical(converted: Converted, tmp_path: Path) -> None:
    back = tmp_path / "back"
    assert (
        main(
            [
                "convert",
                "megatron-to-hf",
                str(converted.megatron_dir),
                str(back),
                "--bridge-dir",
                str(tmp_path / "bridges"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (back / "config.json").read_bytes() == (
        converted.checkpoint.path / "config.json"
    ).read_bytes()
    with (
        CheckpointReader(converted.checkpoint.path) as original,
        CheckpointReader(back) as exported,
    ):
        assert exported.names() == original.names()
        for name in original.names():
            a, b = original.get(name), exported.get(name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert (
                a.contiguous().view(torch.uint8).numpy().tobytes()
                == b.contiguous().view(torch.uint8).numpy().tobytes()
            ), name


def test_hf_export_is_sharded_indexed_and_loadable(tmp_path: Path) -> None:
    """megatron-to-hf at scale: shards under --max-shard-size, an index with total_size, the
    config and generation config copied, and transformers' from_pretrained loads it."""
    import json

    from tests.support import hf_model_class, use_torch_gdn_kernels

    variant = VARIANTS["moe-vl-mtp-packed"]
    checkpoint = make_checkpoint(
        tmp_path / "hf", catalog.entry(variant.model_id).config, seed=3, **variant.options
    )
    generation = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (checkpoint.path / "generation_config.json").write_text(json.dumps(generation))
    args = ["--bridge-dir", str(tmp_path / "bridges"), "--quiet"]
    assert (
        main(["convert", "hf-to-megatron", str(checkpoint.path), str(tmp_path / "megatron"), *args])
        == 0
    )
    assert (
        main(
            [
                "convert",
                "megatron-to-hf",
                str(tmp_path / "megatron"),
                str(tmp_path / "back"),
                "--max-shard-size",
                "200KB",
                *args,
            ]
        )
        == 0
    )
    back = tmp_path / "back"
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in back.glob("model-*.safetensors"))
    with CheckpointReader(back) as reader:
        sizes = {name: reader.tensors[name].nbytes for name in reader.names()}
        assert index["metadata"]["total_size"] == sum(sizes.values())
        per_shard = {}
        for name, shard in index["weight_map"].items():
            per_shard[shard] = per_shard.get(shard, 0) + sizes[name]
        assert all(
            size <= 200_000 or len([n for n, s in index["weight_map"].items() if s == shard]) == 1
            for shard, size in per_shard.items()
        )
    assert json.loads((back / "generation_config.json").read_text()) == generation
    use_torch_gdn_kernels()
    loaded = hf_model_class(checkpoint.config).from_pretrained(back, dtype=torch.float32)
    original = checkpoint.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
