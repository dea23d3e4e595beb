"""The HybridModel target's fixed parts: the pattern symbols against megatron-core's own, the pattern
of a spec and its pipeline segments, the table's explicit physical numbering (and what it refuses),
the committed hybrid bridges and manifests against their configs and their GPT twins, and the
names the CPU backend stands in for (docs/reference.md section 12).

Expected values are typed from the catalog configs and megatron-core's source, not from the
generator's output.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from qwen35_bridge import targets
from qwen35_bridge.mapping.kinds import Rename
from qwen35_codegen import catalog, checkout
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.review import manifest
from qwen35_codegen.review.key_families import format_ranges

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

ENTRIES = bridge_index.read(checkout.GENERATED)
HYBRID = bridge_index.by_model(ENTRIES, "hybrid")
GPT = bridge_index.by_model(ENTRIES)


def test_symbols_are_megatron_cores() -> None:
    from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols

    assert (targets.GDN, targets.ATTENTION, targets.MLP, targets.MOE) == (
        Symbols.GDN,
        Symbols.ATTENTION,
        Symbols.MLP,
        Symbols.MOE,
    )
    assert (targets.MTP_SEPARATOR, targets.PIPE) == (Symbols.MTP_SEPARATOR, Symbols.PIPE)


def test_a_specs_pattern_and_megatron_cores_reading_of_it() -> None:
    from megatron.core.models.hybrid.hybrid_layer_allocation import (
        get_hybrid_total_layer_count,
        parse_hybrid_pattern,
    )

    layer_types = ("gdn", "gdn", "gdn", "attention") * 2
    pattern = targets.hybrid_layer_pattern(layer_types, ("moe",) * 8, 1, "moe")
    assert pattern == "GEGEGE*EGEGEGE*E/*E"
    parsed = parse_hybrid_pattern(pattern)
    assert (parsed.main_pattern, parsed.mtp_pattern, parsed.mtp_num_depths) == (
        "GEGEGE*EGEGEGE*E",
        "*E",
        1,
    )
    assert get_hybrid_total_layer_count(pattern) == 16
    assert targets.hybrid_layer_pattern(("gdn", "attention"), ("dense",) * 2, 2) == "G-*-/*-/*-"
    assert targets.hybrid_layer_pattern(("attention",), ("dense",)) == "*-"
    # Pipeline segments hold whole logical layers: segment vp * pp + pp_rank, offset before it.
    staged = targets.pipeline_pattern(pattern, 4)
    assert staged == "GEGE|GE*E|GEGE|GE*E/*E"
    assert get_hybrid_total_layer_count(staged) == 16
    assert targets.pipeline_pattern(pattern, 1) == "GEGEGE*EGEGEGE*E/*E"
    with pytest.raises(ValueError, match="8 layers cannot be cut into 3 pipeline segments"):
        targets.pipeline_pattern(pattern, 3)
    with pytest.raises(ValueError, match="must be mixer-MLP pairs"):
        targets.logical_layers("GGE-")
    with pytest.raises(ValueError, match="unknown target 'mamba'"):
        targets.require_target("mamba")


def test_a_table_numbers_megatron_layers_explicitly() -> None:
    mapping = Rename(
        "decoder.layers.{j}.mlp.linear_fc2.weight",
        hf="model.layers.{i}.mlp.down_proj.weight",
        shape=(4, 8),
        layers=(0, 3),
        megatron_layers=(1, 7),
    )
    assert [(dict(g.hf), dict(g.megatron)) for g in mapping.groups()] == [
        (
            {"model.layers.0.mlp.down_proj.weight": (4, 8)},
            {"decoder.layers.1.mlp.linear_fc2.weight": (4, 8)},
        ),
        (
            {"model.layers.3.mlp.down_proj.weight": (4, 8)},
            {"decoder.layers.7.mlp.linear_fc2.weight": (4, 8)},
        ),
    ]
    refused = {
        "numbers its layer {j}": dict(megatron="decoder.layers.{i}.w", megatron_layers=(1, 7)),
        "2 layers but 1 megatron_layers": dict(
            megatron="decoder.layers.{j}.w", megatron_layers=(1,)
        ),
        "needs megatron_layers": dict(megatron="decoder.layers.{j}.w"),
    }
    for message, fields in refused.items():
        with pytest.raises(ValueError, match=message):
            Rename(**fields, hf="model.layers.{i}.w", shape=(1,), layers=(0, 3))


def test_committed_hybrid_bridges_exist_for_dense_moe_and_vl() -> None:
    kinds = set()
    for model_id, entry in HYBRID.items():
        config = catalog.entry(model_id).config
        text = config.get("text_config", config)
        kinds.add("moe" if text.get("num_experts") else "dense")
        kinds.add("vl" if "vision_config" in config else "text")
        assert entry.options == {"target": "hybrid"} and entry.module.endswith("_hybrid")
        assert entry.spec_sha256 == GPT[model_id].spec_sha256  # one spec, two renderings
    assert kinds == {"dense", "moe", "vl", "text"}


def test_the_hybrid_qwen3_6_35b_a3b_manifest_follows_its_config() -> None:
    """Typed from the config: 40 layers, full attention every 4th, every layer MoE, one MoE MTP
    layer; logical layer i is physical 2i (mixer) and 2i + 1 (MLP)."""
    config = catalog.entry("Qwen/Qwen3.6-35B-A3B").config["text_config"]
    layers = config["num_hidden_layers"]
    attention = [i for i in range(layers) if (i + 1) % config["full_attention_interval"] == 0]
    gdn = [i for i in range(layers) if i not in attention]
    path = checkout.GENERATED / manifest.file_name(HYBRID["Qwen/Qwen3.6-35B-A3B"].module)
    data = manifest.parse(path.read_text(), path.name)
    gpt_path = checkout.GENERATED / manifest.file_name(GPT["Qwen/Qwen3.6-35B-A3B"].module)
    gpt = manifest.parse(gpt_path.read_text(), gpt_path.name)
    assert data["hf"] == gpt["hf"]  # the same HF checkpoint
    assert data["parameters"] == gpt["parameters"]
    families = data["megatron"]["families"]
    prefix = "language_model."

    def layers_of(family: str) -> str:
        return families[prefix + family]["i"]

    def ranges(values) -> str:
        return format_ranges(values)

    assert layers_of("decoder.layers.{i}.self_attention.in_proj.weight") == ranges(
        2 * i for i in gdn
    )
    assert layers_of("decoder.layers.{i}.self_attention.linear_qkv.weight") == ranges(
        2 * i for i in attention
    )
    assert layers_of("decoder.layers.{i}.mlp.router.weight") == ranges(
        2 * i + 1 for i in range(layers)
    )
    experts = families[prefix + "decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}"]
    assert experts["e"] == f"0-{config['num_experts'] - 1}"
    assert experts["count"] == layers * config["num_experts"]
    assert families[prefix + "decoder.final_norm.weight"]["shape"] == [config["hidden_size"]]
    inner = "mtp.layers.{i}.mtp_model_layer.layers."
    assert families[prefix + inner + "0.self_attention.linear_qkv.weight"]["i"] == "0"
    assert families[prefix + inner + "1.mlp.experts.linear_fc2.weight{e}"]["count"] == (
        config["num_experts"]
    )
    assert not [f for f in families if "final_layernorm" in f and "mtp" not in f]
    assert sum(f["count"] for f in families.values()) == gpt["megatron"]["keys"]


@pytest.mark.parametrize("model_id", sorted(HYBRID))
def test_hybrid_model_matches_the_bridge(model_id: str) -> None:
    """The committed full-size hybrid bridge against megatron-core's HybridModel built on the
    meta device (and, for a VL model, the whole VL model around it): exactly its tensors, with
    its shapes, and the same HF tensors as the model's GPT bridge."""
    from qwen35_bridge.generated import load_bridge
    from qwen35_bridge.megatron.live import global_parameters
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    bridge = load_bridge(model_id, "hybrid")()
    assert bridge.target == "hybrid"
    assert bridge.hf_shapes == load_bridge(model_id)().hf_shapes
    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = bridge.build(**parallel)
        language_model = model.language_model if bridge.is_vl else model
        assert type(language_model).__name__ == "HybridModel"
        logical = targets.logical_layers(bridge.hybrid_layer_pattern)
        assert len(language_model.decoder.layers) == 2 * len(logical)
        params = {k: tuple(c[0].shape) for k, c in global_parameters(model, "").items()}
    finally:
        destroy_parallel()
    assert set(params) == set(bridge.megatron_shapes), (
        sorted(set(params) - set(bridge.megatron_shapes))[:3],
        sorted(set(bridge.megatron_shapes) - set(params))[:3],
    )
    assert not {n: s for n, s in bridge.megatron_shapes.items() if params[n] != s}
    numel = sum(math.prod(s) for s in bridge.megatron_shapes.values())
    assert numel == sum(math.prod(s) for s in bridge.hf_shapes.values())


def test_cpu_stand_ins_cover_every_te_name_of_the_hybrid_spec() -> None:
    """hybrid_layer_specs imports these TE names; the CPU spec replaces each one (and no other)."""
    import megatron.core.models.hybrid.hybrid_layer_specs as specs

    from qwen35_bridge.megatron.cpu_backend.hybrid_stack import STAND_INS

    te_names = {name for name in vars(specs) if name.startswith("TE")}
    assert te_names == set(STAND_INS)


def test_generate_writes_a_hybrid_module_named_after_its_target(tmp_path, capsys) -> None:
    assert (
        main(
            ["generate", "catalog:Qwen/Qwen3.5-0.8B", "--target", "hybrid", "--out", str(tmp_path)]
        )
        == 0
    )
    text = (tmp_path / "qwen3_5_0_8b_hybrid.py").read_text()
    assert (
        'TARGET = "hybrid"' in text
        and "codegen generate catalog:Qwen/Qwen3.5-0.8B --target hybrid" in text
    )
    config = catalog.entry("Qwen/Qwen3.5-0.8B").config["text_config"]
    symbols = {"linear_attention": "G", "full_attention": "*"}
    pattern = "".join(symbols[t] + "-" for t in config["layer_types"])
    assert f'HYBRID_LAYER_PATTERN = "{pattern}/*-"' in text
    assert f"NUM_HYBRID_LAYERS = {2 * config['num_hidden_layers']}" in text
    with pytest.raises(SystemExit) as stop:
        main(["generate", "catalog:Qwen/Qwen3.5-0.8B", "--target", "mamba", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "--target: invalid choice: 'mamba'" in capsys.readouterr().err


def test_index_lists_both_targets_and_load_bridge_picks_one() -> None:
    from qwen35_bridge.generated import MODULES, load_bridge

    data = json.loads((checkout.GENERATED / bridge_index.INDEX_JSON).read_text())
    assert set(data["bridges"]) == {e.module for e in ENTRIES.values()}
    for model_id, entry in HYBRID.items():
        assert MODULES[model_id, "hybrid"] == entry.module
        assert load_bridge(model_id, "hybrid").target == "hybrid"
        assert load_bridge(model_id).target == "gpt"
    with pytest.raises(KeyError, match="with target 'hybrid'"):
        load_bridge("Qwen/Qwen3.5-0.8B", "hybrid")
