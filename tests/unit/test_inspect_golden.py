"""Golden tests of `codegen inspect` for every catalog config.

Expected values are typed from the published configs, PROVENANCE.md's table and docs/reference.md, not
from the generator's output.
"""

from __future__ import annotations

import json

import pytest

from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main

VL = "model.language_model."
# model id: family, architecture, layers, hidden, MLP kind, experts / MTP experts layout, tied,
# vision (depth, hidden) or None, (heads, kv heads), (GDN key heads, value heads), vocab.
GOLDEN = {
    "Qwen/Qwen3.5-0.8B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        24,
        1024,
        "dense",
        None,
        None,
        True,
        (12, 768),
        (8, 2),
        (16, 16),
        248320,
    ),
    "Qwen/Qwen3.5-4B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        32,
        2560,
        "dense",
        None,
        None,
        True,
        (24, 1024),
        (16, 4),
        (16, 32),
        248320,
    ),
    "Qwen/Qwen3.5-9B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        32,
        4096,
        "dense",
        None,
        None,
        False,
        (27, 1152),
        (16, 4),
        (16, 32),
        248320,
    ),
    "Qwen/Qwen3.5-27B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        64,
        5120,
        "dense",
        None,
        None,
        False,
        (27, 1152),
        (24, 4),
        (16, 48),
        248320,
    ),
    "Qwen/Qwen3.6-27B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        64,
        5120,
        "dense",
        None,
        None,
        False,
        (27, 1152),
        (24, 4),
        (16, 48),
        248320,
    ),
    "Qwen/Qwen3.5-35B-A3B": (
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        40,
        2048,
        "moe",
        "packed",
        "per_expert",
        False,
        (27, 1152),
        (16, 2),
        (16, 32),
        248320,
    ),
    "Qwen/Qwen3.5-122B-A10B": (
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        48,
        3072,
        "moe",
        "packed",
        "per_expert",
        False,
        (27, 1152),
        (32, 2),
        (16, 64),
        248320,
    ),
    "Qwen/Qwen3.5-397B-A17B": (
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        60,
        4096,
        "moe",
        "packed",
        "per_expert",
        False,
        (27, 1152),
        (32, 2),
        (16, 64),
        248320,
    ),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": (
        "qwen3_next",
        "Qwen3NextForCausalLM",
        48,
        2048,
        "moe",
        "per_expert",
        "per_expert",
        False,
        None,
        (16, 2),
        (16, 32),
        151936,
    ),
    "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8": (
        "qwen3_next",
        "Qwen3NextForCausalLM",
        48,
        2048,
        "moe",
        "per_expert",
        "per_expert",
        False,
        None,
        (16, 2),
        (16, 32),
        151936,
    ),
    "Qwen/Qwen3.6-35B-A3B": (
        "qwen3_5_moe",
        "Qwen3_5MoeForConditionalGeneration",
        40,
        2048,
        "moe",
        "packed",
        "packed",
        False,
        (27, 1152),
        (16, 2),
        (16, 32),
        248320,
    ),
    # Flat text config (Qwen3_5MoeForCausalLM, weights under model.); no catalog statement of
    # its MTP experts' storage, so inspect leaves it open.
    "Qwen/Qwen3.8-2.4T-A95B": (
        "qwen3_5_moe",
        "Qwen3_5MoeForCausalLM",
        92,
        8192,
        "moe",
        "packed",
        None,
        False,
        None,
        (64, 4),
        (16, 128),
        248320,
    ),
    # Reconstructed: Qwen3.6-27B's config under another id.
    "Qwen/Qwen3.8-27B": (
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        64,
        5120,
        "dense",
        None,
        None,
        False,
        (27, 1152),
        (24, 4),
        (16, 48),
        248320,
    ),
}
EXPERTS = {
    "Qwen/Qwen3.5-35B-A3B": (256, 8, 512, 512),
    "Qwen/Qwen3.5-122B-A10B": (256, 8, 1024, 1024),
    "Qwen/Qwen3.5-397B-A17B": (512, 10, 1024, 1024),
    "Qwen/Qwen3.6-35B-A3B": (256, 8, 512, 512),
    "Qwen/Qwen3.8-2.4T-A95B": (512, 10, 2048, 2048),
    "Qwen/Qwen3-Next-80B-A3B-Instruct": (512, 10, 512, 512),
    "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8": (512, 10, 512, 512),
}


def inspect(ref: str, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["inspect", ref]) == 0
    return json.loads(capsys.readouterr().out)


def test_golden_covers_the_whole_catalog():
    assert set(GOLDEN) == set(catalog.model_ids())


@pytest.mark.parametrize("model_id", sorted(GOLDEN))
def test_inspect(model_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    family, arch, layers, hidden, mlp, experts, mtp_experts, tied, vision, heads, gdn, vocab = (
        GOLDEN[model_id]
    )
    spec = inspect(f"catalog:{model_id}", capsys)
    assert spec["family"] == family
    assert spec["architecture"] == arch
    assert spec["hf_prefix"] == (VL if vision else "model.")
    assert spec["layer_types"] == ["gdn", "gdn", "gdn", "attention"] * (
        layers // 4
    )  # attention every 4th
    assert spec["mlp_types"] == [mlp] * layers
    assert (
        spec["hidden_size"] == hidden
        and spec["vocab_size"] == vocab
        and spec["num_layers"] == layers
    )
    assert spec["experts_layout"] == experts
    assert spec["mtp_experts_layout"] == mtp_experts
    assert spec["mtp_layers"] == 1 and spec["mtp_mlp_type"] == mlp
    assert spec["tie_word_embeddings"] is tied
    assert (
        spec["attention"]["num_heads"],
        spec["attention"]["num_kv_heads"],
        spec["attention"]["head_dim"],
    ) == (*heads, 256)
    assert (spec["gdn"]["num_key_heads"], spec["gdn"]["num_value_heads"]) == gdn
    assert (
        spec["gdn"]["key_head_dim"] == spec["gdn"]["value_head_dim"] == 128
        and spec["gdn"]["conv_kernel"] == 4
    )
    assert spec["gdn"]["hf_layout"] == ("grouped" if family == "qwen3_next" else "split")
    assert spec["attention"]["rotary_percent"] == 0.25 and spec["attention"]["rope_theta"] == 1e7
    assert spec["rms_norm_eps"] == 1e-6
    if vision:
        assert (spec["vision"]["depth"], spec["vision"]["hidden_size"]) == vision
        assert spec["vision"]["out_hidden_size"] == hidden
        assert spec["attention"]["mrope_section"] == [11, 11, 10]
    else:
        assert spec["vision"] is None
    if mlp == "moe":
        m = spec["moe"]
        assert (
            m["num_experts"],
            m["top_k"],
            m["expert_intermediate_size"],
            m["shared_expert_intermediate_size"],
        ) == EXPERTS[model_id]
        assert m["renormalize"] is True
        assert spec["dense_intermediate_size"] is None
    else:
        assert spec["moe"] is None and spec["dense_intermediate_size"] > 0
    assert spec["quantization"] == (
        {
            "method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
            "activation_scheme": "dynamic",
            "modules_to_not_convert": spec["quantization"]["modules_to_not_convert"],
        }
        if model_id.endswith("FP8")
        else None
    )


def test_qwen3_next_mtp_count_is_an_assumption_and_says_so(capsys):
    spec = inspect("catalog:Qwen/Qwen3-Next-80B-A3B-Instruct", capsys)
    assert any("mtp_layers = 1: assumed" in note for note in spec["notes"])


def test_fp8_keeps_modules_to_not_convert(capsys):
    spec = inspect("catalog:Qwen/Qwen3-Next-80B-A3B-Instruct-FP8", capsys)
    skip = spec["quantization"]["modules_to_not_convert"]
    assert (
        "lm_head" in skip and "mtp.fc" in skip and "model.layers.0.linear_attn.in_proj_ba" in skip
    )


def test_the_hub_id_falls_back_to_the_catalog_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = inspect("Qwen/Qwen3.5-27B", capsys)
    assert spec["source"] == "catalog:Qwen/Qwen3.5-27B"
    assert spec["provenance"].startswith("catalog, verbatim")


def test_reconstructed_entries_list_what_they_assume():
    entry = catalog.entry("Qwen/Qwen3.5-9B")
    assumed = entry.assumed_fields()
    assert "text_config.tie_word_embeddings" in assumed and "text_config.vocab_size" in assumed
    assert "text_config.hidden_size" not in assumed
    assert entry.config["vision_config"]["out_hidden_size"] == 4096
