"""Bad input fails with one line naming the field, the value and what was expected; exit code 2;
no file written anywhere. Also the inference rules that decide layouts from an index or options."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qwen35_codegen import catalog
from qwen35_codegen.checkout import GENERATED
from qwen35_codegen.cli.main import main

DENSE = catalog.entry("Qwen/Qwen3.6-27B").config
MOE = catalog.entry("Qwen/Qwen3.5-35B-A3B").config
NEXT = catalog.entry("Qwen/Qwen3-Next-80B-A3B-Instruct").config
# Qwen3.8: a flat qwen3_5_moe_text config with the fields the newest releases carry.
QWEN38 = catalog.entry("Qwen/Qwen3.8-2.4T-A95B").config


def edited(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with dotted paths set (value `DELETE` removes the key)."""
    config = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return config


DELETE = object()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def run_generate(
    tmp_path: Path, config: dict[str, Any] | str, capsys, *extra: str
) -> tuple[int, str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (model / "config.json").write_text(text)
    out = tmp_path / "out"
    before = snapshot(GENERATED)
    code = main(["generate", str(model), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert snapshot(GENERATED) == before, "qwen35_bridge/generated/ must not change on an error"
    if code != 0:
        assert not out.exists() or not any(out.iterdir()), "nothing may be written on an error"
    return code, err


CASES = {
    "rejected architecture": (
        edited(DENSE, model_type="qwen4_exp"),
        ["model_type", "qwen4_exp", "different architecture"],
    ),
    "unknown architecture": (
        edited(DENSE, model_type="llama"),
        ["model_type", "'llama'", "expected one of"],
    ),
    "architectures contradict model_type": (
        edited(DENSE, architectures=["Qwen3NextForCausalLM"]),
        ["architectures", "Qwen3_5ForConditionalGeneration"],
    ),
    "missing hidden size": (
        edited(DENSE, text_config__hidden_size=DELETE),
        ["text_config.hidden_size", "missing", "no library default"],
    ),
    "missing rope theta": (
        edited(DENSE, text_config__rope_parameters__rope_theta=DELETE),
        ["rope_theta", "missing"],
    ),
    "unknown key": (
        edited(DENSE, text_config__use_fancy_norm=True),
        ["text_config.use_fancy_norm", "known key"],
    ),
    "unknown top-level key": (edited(DENSE, deepstack=True), ["deepstack", "known key"]),
    "tie flags disagree": (
        edited(DENSE, text_config__tie_word_embeddings=True),
        ["text_config.tie_word_embeddings", "top-level value"],
    ),
    "layer_types length": (
        edited(DENSE, text_config__layer_types=["linear_attention"] * 3 + ["full_attention"]),
        ["text_config.layer_types", "64 layer types"],
    ),
    "layer_types entry": (
        edited(DENSE, text_config__layer_types=["sliding_attention"] * 64),
        ["text_config.layer_types[0]", "sliding_attention"],
    ),
    "ungated attention": (
        edited(DENSE, text_config__attn_output_gate=False),
        ["text_config.attn_output_gate", "False", "True"],
    ),
    "dedicated MTP embeddings": (
        edited(DENSE, text_config__mtp_use_dedicated_embeddings=True),
        ["text_config.mtp_use_dedicated_embeddings"],
    ),
    # transformers 5.24 computes the GDN norm gate with silu (`swish`) only: another value
    # would change the forward, so it is refused by name (here on the flat Qwen3.8 config).
    "GDN output gate activation": (
        edited(QWEN38, output_gate_type="sigmoid"),
        ["config field output_gate_type: 'sigmoid'", "'swish'"],
    ),
    "dedicated MTP embeddings, flat config": (
        edited(QWEN38, mtp_use_dedicated_embeddings=True),
        ["config field mtp_use_dedicated_embeddings: True", "False"],
    ),
    "activation": (
        edited(DENSE, text_config__hidden_act="gelu"),
        ["text_config.hidden_act", "'gelu'", "'silu'"],
    ),
    "MTP needs the last layer's spec": (
        edited(DENSE, text_config__layer_types=["full_attention", "linear_attention"] * 32),
        ["text_config.mtp_num_hidden_layers", "layer 63 is gdn"],
    ),
    "kv heads": (
        edited(DENSE, text_config__num_key_value_heads=5),
        ["text_config.num_key_value_heads", "divisor"],
    ),
    "GDN heads": (
        edited(DENSE, text_config__linear_num_value_heads=20),
        ["text_config.linear_num_value_heads", "multiple"],
    ),
    "mrope sections": (
        edited(DENSE, text_config__rope_parameters__mrope_section=[11, 11, 11]),
        ["mrope_section", "half the rotary dim"],
    ),
    "vision output": (
        edited(DENSE, vision_config__out_hidden_size=4096),
        ["vision_config.out_hidden_size", "5120"],
    ),
    "deepstack vision": (
        edited(DENSE, vision_config__deepstack_visual_indexes=[8, 16]),
        ["vision_config.deepstack_visual_indexes"],
    ),
    "negative size": (
        edited(DENSE, text_config__intermediate_size=-1),
        ["text_config.intermediate_size", "positive integer"],
    ),
    "MoE mlp_only_layers": (
        edited(MOE, text_config__mlp_only_layers=[0]),
        ["text_config.mlp_only_layers", "every Qwen3.5-MoE layer"],
    ),
    "Qwen3.5-MoE without renormalisation": (
        edited(MOE, text_config__norm_topk_prob=False),
        ["text_config.norm_topk_prob"],
    ),
    "rope scaling": (edited(NEXT, rope_scaling={"type": "yarn"}), ["rope_scaling", "null"]),
    "FP8 format": (
        edited(
            NEXT,
            quantization_config={
                "quant_method": "fp8",
                "fmt": "e5m2",
                "weight_block_size": [128, 128],
                "activation_scheme": "dynamic",
            },
        ),
        ["quantization_config.fmt", "e5m2"],
    ),
    "ModelOpt quantization_config": (
        edited(
            QWEN38,
            quantization_config={"quant_method": "modelopt", "quant_algo": "NVFP4"},
        ),
        ["ModelOpt NVFP4 checkpoint", "quant_method modelopt", "not supported"],
    ),
    "not JSON": ("{not json", ["not valid JSON"]),
    "JSON array": ("[1, 2]", ["expected a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_fails_cleanly(case: str, tmp_path: Path, capsys) -> None:
    config, expected = CASES[case]
    code, err = run_generate(tmp_path, config, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_the_console_script_exits_2(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(edited(DENSE, model_type="qwen4_exp")))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen35_codegen",
            "generate",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("codegen generate: error: config field model_type: 'qwen4_exp'")
    assert not (tmp_path / "out").exists()


def test_unresolvable_reference(capsys) -> None:
    assert main(["inspect", "./no/such/dir"]) == 2
    assert "not a hub id" in capsys.readouterr().err
    assert main(["inspect", "catalog:Qwen/Qwen9-1B"]) == 2
    assert "not in the catalog" in capsys.readouterr().err


# -- Layouts: the index decides, then the catalog, then the user; MTP experts may need a choice ---


def write_model(
    tmp_path: Path, config: dict[str, Any], weight_map: dict[str, str] | None = None
) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if weight_map is not None:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    return tmp_path


def moe_weight_map(
    mtp_packed: bool, decoder_packed: bool = True, lm_head: bool = True
) -> dict[str, str]:
    keys = ["model.language_model.embed_tokens.weight", "mtp.fc.weight"]
    keys.append(
        "model.language_model.layers.0.mlp.experts.gate_up_proj"
        if decoder_packed
        else "model.language_model.layers.0.mlp.experts.0.gate_proj.weight"
    )
    keys.append(
        "mtp.layers.0.mlp.experts.gate_up_proj"
        if mtp_packed
        else "mtp.layers.0.mlp.experts.0.gate_proj.weight"
    )
    if lm_head:
        keys.append("lm_head.weight")
    return {k: "model-00001-of-00001.safetensors" for k in keys}


def inspect_json(ref: Path | str, capsys, *extra: str) -> dict[str, Any]:
    assert main(["inspect", str(ref), *extra]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_moe_mtp_layout_without_index_needs_a_choice(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path, MOE)
    spec = inspect_json(model, capsys)
    assert spec["mtp_experts_layout"] is None
    assert "choose with --mtp-experts" in spec["mtp_experts_layout_reason"]
    assert main(["generate", str(model), "--out", str(tmp_path / "out")]) == 2
    assert "pass --mtp-experts packed|per_expert" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (
        main(["generate", str(model), "--out", str(tmp_path / "out"), "--mtp-experts", "packed"])
        == 0
    )
    (module,) = (tmp_path / "out").glob("*.py")
    assert 'hf="mtp.layers.{i}.mlp.experts.gate_up_proj"' in module.read_text()


@pytest.mark.parametrize("mtp_packed", [True, False])
def test_index_decides_the_mtp_layout(tmp_path: Path, capsys, mtp_packed: bool) -> None:
    spec = inspect_json(write_model(tmp_path, MOE, moe_weight_map(mtp_packed)), capsys)
    assert spec["mtp_experts_layout"] == ("packed" if mtp_packed else "per_expert")
    assert spec["experts_layout"] == "packed"


def test_index_decides_the_decoder_layout(tmp_path: Path, capsys) -> None:
    spec = inspect_json(
        write_model(tmp_path, MOE, moe_weight_map(True, decoder_packed=False)), capsys
    )
    assert spec["experts_layout"] == "per_expert"


def test_a_choice_contradicting_the_index_is_an_error(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path, MOE, moe_weight_map(mtp_packed=True))
    assert main(["inspect", str(model), "--mtp-experts", "per_expert"]) == 2
    assert (
        "--mtp-experts: 'per_expert'; expected 'packed', the layout in the index"
        in capsys.readouterr().err
    )


def test_index_contradicting_the_tie_flag_is_an_error(tmp_path: Path, capsys) -> None:
    model = write_model(tmp_path, MOE, moe_weight_map(mtp_packed=True, lm_head=False))
    assert main(["inspect", str(model)]) == 2
    assert (
        "tie_word_embeddings: False; expected True: the index lacks lm_head.weight"
        in capsys.readouterr().err
    )


def test_custom_layer_types_are_honoured_exactly(tmp_path: Path, capsys) -> None:
    pattern = [
        "linear_attention",
        "full_attention",
        "linear_attention",
        "linear_attention",
        "full_attention",
        "full_attention",
    ] * 4
    config = edited(DENSE, text_config__layer_types=pattern, text_config__num_hidden_layers=24)
    spec = inspect_json(write_model(tmp_path, config), capsys)
    assert spec["layer_types"] == ["gdn", "attention", "gdn", "gdn", "attention", "attention"] * 4
    assert any(
        "full_attention_interval 4 does not describe layer_types" in n for n in spec["notes"]
    )


def test_interval_without_layer_types(tmp_path: Path, capsys) -> None:
    config = edited(
        DENSE,
        text_config__layer_types=DELETE,
        text_config__full_attention_interval=2,
        text_config__num_hidden_layers=6,
    )
    spec = inspect_json(write_model(tmp_path, config), capsys)
    assert spec["layer_types"] == ["gdn", "attention"] * 3


def test_qwen3_next_sparse_step_and_mlp_only_layers(tmp_path: Path, capsys) -> None:
    config = edited(NEXT, decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=8)
    spec = inspect_json(write_model(tmp_path, config, None), capsys)
    # MoE iff i not in mlp_only_layers and (i + 1) % 2 == 0: layers 1, 5, 7; layer 3 is dense-only.
    assert spec["mlp_types"] == ["dense", "moe", "dense", "dense", "dense", "moe", "dense", "moe"]
    assert spec["dense_intermediate_size"] == 5120


def test_text_only_prefix_comes_from_the_index(tmp_path: Path, capsys) -> None:
    text = copy.deepcopy(DENSE["text_config"]) | {"architectures": ["Qwen3_5ForCausalLM"]}
    weight_map = {
        k: "model.safetensors"
        for k in [
            "model.language_model.embed_tokens.weight",
            "lm_head.weight",
            "mtp.layers.0.input_layernorm.weight",
        ]
    }
    spec = inspect_json(write_model(tmp_path, text, weight_map), capsys)
    assert spec["architecture"] == "Qwen3_5ForCausalLM" and spec["vision"] is None
    assert spec["hf_prefix"] == "model.language_model."


def test_a_config_nested_past_the_parsers_depth(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["inspect", str(tmp_path)]) == 2
    assert "config.json: not valid JSON" in capsys.readouterr().err


MODELOPT_MARKER = {
    "producer": {"name": "modelopt", "version": "0.33.0"},
    "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]},
}


def test_a_modelopt_nvfp4_folder_is_refused_by_name(tmp_path: Path, capsys) -> None:
    """An NVFP4 export carries `hf_quant_config.json` beside a config that may say nothing."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "hf_quant_config.json").write_text(json.dumps(MODELOPT_MARKER))
    code, err = run_generate(tmp_path, QWEN38, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "NVIDIA ModelOpt NVFP4 checkpoint" in err and "hf_quant_config.json" in err
    assert not (tmp_path / "out").exists()


def test_a_quantization_config_of_another_method_names_it() -> None:
    from qwen35_codegen.errors import ConfigError
    from qwen35_codegen.spec import infer_spec

    config = edited(QWEN38, quantization_config={"quant_method": "compressed-tensors"})
    with pytest.raises(ConfigError, match="quant_method: 'compressed-tensors'; expected 'fp8'"):
        infer_spec(config)
