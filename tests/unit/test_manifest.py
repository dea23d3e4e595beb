"""Key manifests: their notation, their agreement with the real models (built at full size on the
meta device), their parameter counts, and the manifest check catching a table edited by hand.

Expected values are typed from the catalog configs, not from the generator's output.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from qwen35_codegen import catalog, checkout, pipeline
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.review import manifest
from qwen35_codegen.review.key_families import (
    KeyFamily,
    families_of,
    format_ranges,
    generalise,
    parse_ranges,
)
from tests.unit.test_full_size_structure import bridge_of, hf_on_disk_shapes

MODEL_IDS = sorted(catalog.model_ids())
ENTRIES = bridge_index.by_model(bridge_index.read(checkout.GENERATED))


def committed_manifest(model_id: str) -> manifest.Manifest:
    path = checkout.GENERATED / manifest.file_name(ENTRIES[model_id].module)
    return manifest.parse(path.read_text(encoding="utf-8"), path.name)


@functools.cache
def hf_model_shapes(model_id: str) -> dict[str, tuple[int, ...]]:
    """The HF model's parameters (on meta) under the names the checkpoint's expert layout gives them."""
    _, spec = pipeline.infer(pipeline.request_of(ENTRIES[model_id]))
    return hf_on_disk_shapes(model_id, spec.experts_layout)


def expand(data: manifest.Manifest, side: str) -> dict[str, tuple[int, ...]]:
    return {key: family.shape for family in manifest.families(data, side) for key in family.keys()}


# -- Notation ------------------------------------------------------------------------------------


def test_ranges_are_compact_and_exact() -> None:
    assert format_ranges([0, 1, 2, 4, 5, 6, 9]) == "0-2,4-6,9"
    assert format_ranges([3, 7, 11]) == "3,7,11"
    assert format_ranges([5]) == "5"
    assert parse_ranges("0-2,4-6,9") == (0, 1, 2, 4, 5, 6, 9)
    with pytest.raises(Exception, match="not an index range"):
        parse_ranges("0-2,x")


def test_names_fold_into_layer_and_expert_placeholders() -> None:
    assert generalise("model.language_model.layers.12.mlp.experts.7.gate_proj.weight") == (
        "model.language_model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
        (12, 7),
    )
    assert generalise("decoder.layers.3.mlp.experts.linear_fc1.weight255") == (
        "decoder.layers.{i}.mlp.experts.linear_fc1.weight{e}",
        (3, 255),
    )
    assert generalise("vision_model.decoder.layers.0.mlp.linear_fc2.bias") == (
        "vision_model.decoder.layers.{i}.mlp.linear_fc2.bias",
        (0,),
    )
    assert generalise("mtp.fc.weight") == ("mtp.fc.weight", ())


def test_families_record_ranges_counts_and_shapes() -> None:
    shapes = {f"layers.{i}.mlp.experts.{e}.w": (4, 2) for i in (0, 1, 2, 4) for e in range(3)}
    assert families_of(shapes) == {
        "layers.{i}.mlp.experts.{e}.w": KeyFamily(
            "layers.{i}.mlp.experts.{e}.w", ((0, 1, 2, 4), (0, 1, 2)), 12, (4, 2)
        )
    }
    with pytest.raises(Exception, match=r"layers\.\{i\}\.w has tensors of different shapes"):
        families_of({"layers.0.w": (4,), "layers.1.w": (5,)})


# -- Committed manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_manifest_is_self_consistent(model_id: str) -> None:
    """Expanding the families gives exactly the key count and key-set hash the manifest records."""
    data = committed_manifest(model_id)
    assert data["model_id"] == model_id and data["spec_sha256"] == ENTRIES[model_id].spec_sha256
    for side in manifest.SIDES:
        keys = expand(data, side)
        assert (
            sum(f.count for f in manifest.families(data, side)) == len(keys) == data[side]["keys"]
        )
        assert manifest.key_set_sha256(keys) == data[side]["key_set_sha256"]
    numel = {
        side: sum(math.prod(s) for s in expand(data, side).values()) for side in manifest.SIDES
    }
    assert numel["hf"] == numel["megatron"] == data["parameters"]["total"]


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_manifest_matches_the_hf_model(model_id: str) -> None:
    """Every HF family but MTP (which transformers does not build) against the HF model on meta."""
    model = hf_model_shapes(model_id)
    families = {
        k: v
        for k, v in expand(committed_manifest(model_id), "hf").items()
        if not k.startswith("mtp.")
    }
    assert set(families) == set(model), (
        sorted(set(families) - set(model))[:3],
        sorted(set(model) - set(families))[:3],
    )
    assert not {
        name: (families[name], shape) for name, shape in model.items() if families[name] != shape
    }


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_manifest_matches_the_megatron_model(model_id: str) -> None:
    """Language-model families against megatron-core's GPTModel on meta; the vision families
    (not in GPTModel) against the HF vision tower, tensor for tensor by shape."""
    from qwen35_bridge.megatron.live import global_parameters
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    bridge, data = bridge_of(model_id), committed_manifest(model_id)
    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = bridge.build_model(**parallel)
        params = {
            k: tuple(copies[0].shape)
            for k, copies in global_parameters(model, bridge.megatron_prefix).items()
        }
    finally:
        destroy_parallel()
    families = expand(data, "megatron")
    language = {k: v for k, v in families.items() if not k.startswith("vision_model.")}
    assert set(language) == set(params), (
        sorted(set(language) - set(params))[:3],
        sorted(set(params) - set(language))[:3],
    )
    assert not {
        name: (language[name], shape) for name, shape in params.items() if language[name] != shape
    }
    hf_vision = [s for k, s in hf_model_shapes(model_id).items() if k.startswith("model.visual.")]
    assert Counter(s for k, s in families.items() if k.startswith("vision_model.")) == Counter(
        hf_vision
    )
    assert bool(hf_vision) == (catalog.entry(model_id).config.get("vision_config") is not None)


def test_parameter_counts_follow_the_configs() -> None:
    """Component sums typed from the configs' dimensions."""
    dense = committed_manifest("Qwen/Qwen3.5-27B")[
        "parameters"
    ]  # hidden 5120, 64 layers, MLP 17408
    assert dense["embedding"] == dense["output_layer"] == 248320 * 5120
    assert dense["dense_mlp"] == 64 * (3 * 17408 * 5120 + 5120)
    q, kv, o = (
        24 * 2 * 256 * 5120,
        2 * 4 * 256 * 5120,
        5120 * 24 * 256,
    )  # 24 heads, 4 KV heads, head 256
    assert dense["attention_layers"] == 16 * (q + kv + o + 2 * 256 + 5120)
    assert dense["routed_experts"] == dense["shared_experts"] == 0
    moe = committed_manifest("Qwen/Qwen3.5-35B-A3B")[
        "parameters"
    ]  # hidden 2048, 40 layers, 256 experts of 512
    assert moe["routed_experts"] == 40 * 256 * 3 * 512 * 2048
    assert moe["shared_experts"] == 40 * (3 * 512 * 2048 + 2048)
    assert moe["moe_router"] == 40 * (256 * 2048 + 2048)
    assert moe["dense_mlp"] == 0
    tied = committed_manifest("Qwen/Qwen3.5-0.8B")["parameters"]
    assert tied["output_layer"] == 0 and tied["embedding"] == 248320 * 1024


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_total_is_near_the_size_in_the_name(model_id: str) -> None:
    size = re.search(r"-(\d+(?:\.\d+)?)([BT])", model_id)
    billions = float(size.group(1)) * (1000 if size.group(2) == "T" else 1)
    assert (
        0.9 * billions
        <= committed_manifest(model_id)["parameters"]["total"] / 1e9
        <= 1.2 * billions
    )


# -- The manifest check --------------------------------------------------------------------------

Q_NORM = re.compile(
    r'    Rename\(\n        "language_model\.decoder\.layers\.\{i\}\.self_attention\.q_layernorm\.weight",\n.*?\n    \),\n',
    re.S,
)
HF_Q_NORM = "model.language_model.layers.{i}.self_attn.q_norm.weight"
MEG_Q_NORM = "language_model.decoder.layers.{i}.self_attention.q_layernorm.weight"


def committed_27b() -> tuple[str, str]:
    module = (checkout.GENERATED / "qwen3_5_27b.py").read_text(encoding="utf-8")
    return module, (checkout.GENERATED / "qwen3_5_27b.manifest.json").read_text(encoding="utf-8")


def test_a_dropped_mapping_is_named() -> None:
    module, recorded = committed_27b()
    assert len(Q_NORM.findall(module)) == 1
    problems = manifest.verify(Q_NORM.sub("", module), recorded, "qwen3_5_27b")
    assert problems == [
        f"manifest family {HF_Q_NORM} (HF) is not mapped",
        f"manifest family {MEG_Q_NORM} (Megatron) is not mapped",
    ]


def test_a_reshaped_mapping_is_named() -> None:
    module, recorded = committed_27b()
    block = Q_NORM.search(module).group()
    problems = manifest.verify(
        module.replace(block, block.replace("shape=(256,)", "shape=(128,)")),
        recorded,
        "qwen3_5_27b",
    )
    assert (
        f"HF family {HF_Q_NORM} is re-shaped: (256,) in the manifest, (128,) in the table"
        in problems
    )
    assert (
        f"Megatron family {MEG_Q_NORM} is re-shaped: (256,) in the manifest, (128,) in the table"
        in problems
    )


def test_a_layer_left_out_is_named() -> None:
    module, recorded = committed_27b()
    attention = ", ".join(str(i) for i in range(3, 64, 4))  # full_attention_interval 4, 64 layers
    assert f"ATTENTION_LAYERS = ({attention})" in module
    edited = module.replace(
        f"ATTENTION_LAYERS = ({attention})",
        f"ATTENTION_LAYERS = ({attention.removesuffix(', 63')})",
    )
    problems = manifest.verify(edited, recorded, "qwen3_5_27b")
    all_attention, without_63 = ",".join(str(i) for i in range(3, 64, 4)), ",".join(
        str(i) for i in range(3, 60, 4)
    )
    assert (
        f"HF family {HF_Q_NORM} covers i {without_63} in the table, i {all_attention} in the manifest"
        in problems
    )


def test_a_manifest_edited_by_hand_is_caught() -> None:
    module, recorded = committed_27b()
    data = json.loads(recorded)
    del data["megatron"]["families"][MEG_Q_NORM]
    problems = manifest.verify(module, manifest.render(data), "qwen3_5_27b")
    assert problems == [f"Megatron family {MEG_Q_NORM} is mapped but not in the manifest"]
    assert manifest.verify(
        module.replace("class Bridge(", "class Renamed("), recorded, "qwen3_5_27b"
    ) == [
        "cannot expand the mapping table: CodegenError: qwen3_5_27b.py defines no Bridge class (a subclass of BridgeBase)"
    ]


def test_check_reports_a_dropped_mapping_a_missing_manifest_and_their_fixes(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A committed folder of two bridges (check regenerates only what its index lists)."""
    folder = tmp_path / "generated"
    folder.mkdir()
    kept = {ENTRIES[m].module: ENTRIES[m] for m in ("Qwen/Qwen3.5-27B", "Qwen/Qwen3.5-4B")}
    for name, text in bridge_index.render(kept).items():
        (folder / name).write_text(text, encoding="utf-8")
    module, recorded = committed_27b()
    (folder / "qwen3_5_27b.py").write_text(Q_NORM.sub("", module), encoding="utf-8")
    (folder / "qwen3_5_27b.manifest.json").write_text(recorded, encoding="utf-8")
    shutil.copy(checkout.GENERATED / "qwen3_5_4b.py", folder)
    monkeypatch.setattr(checkout, "GENERATED", folder)
    assert main(["check"]) == 1
    out = capsys.readouterr().out
    assert (
        f"qwen35_bridge/generated/qwen3_5_27b.py: manifest family {HF_Q_NORM} (HF) is not mapped\n    fix: codegen generate catalog:Qwen/Qwen3.5-27B"
        in out
    )
    assert (
        f"qwen35_bridge/generated/qwen3_5_27b.py: manifest family {MEG_Q_NORM} (Megatron) is not mapped"
        in out
    )
    assert (
        "qwen35_bridge/generated/qwen3_5_4b.manifest.json: missing\n    fix: codegen generate catalog:Qwen/Qwen3.5-4B"
        in out
    )


def test_generate_writes_the_manifest_and_summary_beside_the_module(tmp_path: Path) -> None:
    assert main(["generate", "catalog:Qwen/Qwen3.5-0.8B", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "qwen3_5_0_8b.manifest.json",
        "qwen3_5_0_8b.md",
        "qwen3_5_0_8b.py",
    ]
    assert (tmp_path / "qwen3_5_0_8b.md").read_text().startswith("## Bridge for Qwen/Qwen3.5-0.8B")
    assert (tmp_path / "qwen3_5_0_8b.manifest.json").read_bytes() == (
        checkout.GENERATED / "qwen3_5_0_8b.manifest.json"
    ).read_bytes()
