"""The test-checkpoint factory (tests.support) itself: tiny configs keep the architecture,
models are fully random and deterministic, files are in the real layout, and transformers
reloads them exactly."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support import (
    build_hf_model,
    experts_layout_of,
    hf_config,
    hf_model_class,
    layer_types,
    make_checkpoint,
    moe_layers,
    mtp_tensors,
    pack_experts,
    quantize_fp8_blockwise,
    read_checkpoint,
    read_index,
    reference_mtp_logits,
    scale_mrope_section,
    shard_name,
    text_only_config,
    tiny_config,
    unpack_experts,
)
from tests.support.tiny import schedule_period, text_config_of

QWEN36_27B = "Qwen__Qwen3.6-27B.json"
QWEN35_4B = "Qwen__Qwen3.5-4B.repr.json"
QWEN35_35B = "Qwen__Qwen3.5-35B-A3B.json"
QWEN35_08B = "Qwen__Qwen3.5-0.8B.partial.json"
NEXT = "Qwen__Qwen3-Next-80B-A3B-Instruct.json"
NEXT_FP8 = "Qwen__Qwen3-Next-80B-A3B-Instruct-FP8.repr.json"
CONFIGS = [QWEN36_27B, QWEN35_4B, QWEN35_35B, QWEN35_08B, NEXT, NEXT_FP8]
MOE_CONFIGS = [QWEN35_35B, NEXT]
DENSE_CONFIGS = [QWEN36_27B, QWEN35_4B, QWEN35_08B]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up and contention cost more than they save (3x on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(seed: int = 0, batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_same_keys(source: dict, tiny: dict, where: str) -> None:
    assert set(tiny) == set(
        source
    ), f"{where}: keys added {set(tiny) - set(source)}, lost {set(source) - set(tiny)}"


# --- tiny_config --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_config_keeps_architecture(load_config, name):
    source = load_config(name)
    pristine = json.loads(json.dumps(source))
    tiny = tiny_config(source)
    assert source == pristine, "tiny_config must not modify its input"
    for key in ("architectures", "model_type"):
        assert tiny.get(key) == source.get(key)
    _assert_same_keys(source, tiny, "top level")
    src_text, text = text_config_of(source), text_config_of(tiny)
    _assert_same_keys(src_text, text, "text")
    period = schedule_period(layer_types(source))
    assert layer_types(tiny) == period * 2 and len(period) >= 2
    assert text["num_attention_heads"] // text["num_key_value_heads"] == (
        src_text["num_attention_heads"] // src_text["num_key_value_heads"]
    )
    assert text["linear_num_value_heads"] // text["linear_num_key_heads"] == (
        src_text["linear_num_value_heads"] // src_text["linear_num_key_heads"]
    )
    assert text["num_key_value_heads"] >= 2 and text["linear_num_key_heads"] >= 2
    assert tiny.get("tie_word_embeddings") == source.get("tie_word_embeddings")
    assert text.get("tie_word_embeddings") == src_text.get("tie_word_embeddings")
    for key in (
        "rms_norm_eps",
        "partial_rotary_factor",
        "rope_theta",
        "norm_topk_prob",
        "decoder_sparse_step",
    ):
        assert text.get(key) == src_text.get(key), key
    if "mtp_num_hidden_layers" in src_text:
        assert text["mtp_num_hidden_layers"] == 1
    assert text["hidden_size"] == 64 and text["vocab_size"] == 256


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_config_accepted_by_transformers(load_config, name):
    tiny = tiny_config(load_config(name))
    cfg = hf_config(tiny).get_text_config()
    assert list(cfg.layer_types) == layer_types(tiny)
    assert cfg.num_hidden_layers == len(layer_types(tiny))


@pytest.mark.parametrize("name", [QWEN36_27B, QWEN35_4B, QWEN35_35B, QWEN35_08B])
def test_tiny_config_vision_and_rope(load_config, name):
    source = load_config(name)
    tiny = tiny_config(source)
    text, vision = tiny["text_config"], tiny["vision_config"]
    _assert_same_keys(source["vision_config"], vision, "vision")
    assert vision["model_type"] == source["vision_config"]["model_type"]
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert (
        vision["depth"],
        vision["num_heads"],
        vision["spatial_merge_size"],
        vision["temporal_patch_size"],
    ) == (
        2,
        2,
        2,
        2,
    )
    assert math.isqrt(vision["num_position_embeddings"]) ** 2 == vision["num_position_embeddings"]
    rope = text["rope_parameters"]
    assert rope["mrope_interleaved"] is True and rope["rope_theta"] == 10_000_000
    assert sum(rope["mrope_section"]) == int(text["head_dim"] * rope["partial_rotary_factor"]) // 2
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert 0 <= tiny[key] < text["vocab_size"]
    assert text["eos_token_id"] < text["vocab_size"]


def test_scale_mrope_section():
    assert scale_mrope_section([11, 11, 10], 32) == [11, 11, 10]
    assert scale_mrope_section([11, 11, 10], 8) == [3, 3, 2]
    assert scale_mrope_section([11, 11, 10], 4) == [2, 1, 1]
    assert scale_mrope_section([24, 20, 20], 16) == [6, 5, 5]


def test_tiny_config_honours_explicit_schedule(load_config):
    source = load_config(QWEN36_27B)
    pattern = [
        "linear_attention",
        "full_attention",
        "linear_attention",
        "linear_attention",
        "full_attention",
    ]
    source["text_config"]["layer_types"] = pattern * 3
    source["text_config"]["num_hidden_layers"] = 15
    tiny = tiny_config(source, periods=3)
    assert tiny["text_config"]["layer_types"] == pattern * 3
    model = build_hf_model(tiny, seed=0)
    kinds = [
        "full_attention" if hasattr(layer, "self_attn") else "linear_attention"
        for layer in model.model.language_model.layers
    ]
    assert kinds == pattern * 3


def test_tiny_config_interval_only_stays_interval_only(load_config):
    tiny = tiny_config(load_config(NEXT))
    assert "layer_types" not in tiny and tiny["full_attention_interval"] == 4
    assert tiny["num_hidden_layers"] == 8


def test_qwen3_next_dense_layers_and_routing_flags(load_config):
    source = load_config(NEXT)
    source.update(mlp_only_layers=[0, 5, 40], decoder_sparse_step=2, norm_topk_prob=False)
    tiny = tiny_config(source)
    assert tiny["mlp_only_layers"] == [0, 5] and tiny["decoder_sparse_step"] == 2
    assert tiny["norm_topk_prob"] is False
    model = build_hf_model(tiny, seed=0)
    actual = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert actual == moe_layers(tiny) == [False, True, False, True, False, False, False, True]
    assert model.model.layers[3].mlp.gate.norm_topk_prob is False


def test_tie_override_and_text_only(load_config):
    tiny = tiny_config(load_config(QWEN36_27B), tie=True)
    assert (
        tiny["tie_word_embeddings"] is True and tiny["text_config"]["tie_word_embeddings"] is True
    )
    flat = text_only_config(tiny)
    assert flat["architectures"] == ["Qwen3_5ForCausalLM"] and flat["tie_word_embeddings"] is True
    assert hf_model_class(flat).__name__ == "Qwen3_5ForCausalLM"
    moe_flat = text_only_config(tiny_config(load_config(QWEN35_35B)))
    assert hf_model_class(moe_flat).__name__ == "Qwen3_5MoeForCausalLM"
    # A flat text config is itself a valid input, and text_overrides reach the text fields.
    flat_source = text_only_config(load_config(QWEN35_35B))
    flat_tiny = tiny_config(flat_source, text_overrides={"router_aux_loss_coef": 0.5})
    assert "text_config" not in flat_tiny and flat_tiny["router_aux_loss_coef"] == 0.5
    assert layer_types(flat_tiny) == layer_types(moe_flat)
    assert type(build_hf_model(flat_tiny, seed=0)).__name__ == "Qwen3_5MoeForCausalLM"


# --- build_hf_model -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_parameter_random(load_config, name):
    tiny = tiny_config(load_config(name))
    before = torch.random.get_rng_state()
    model = build_hf_model(tiny, seed=7)
    assert torch.equal(before, torch.random.get_rng_state()), "global RNG must be untouched"
    for pname, param in model.named_parameters():
        assert param.numel() > 1 and param.std() > 0, f"{pname} is constant"
        if re.search(r"linear_attn\.norm\.weight$", pname):
            assert 0.5 <= param.min() and param.max() <= 2.0, pname
            assert torch.equal((param - 1) + 1, param), pname
        elif re.search(r"(layernorm|norm|q_norm|k_norm)\.weight$", pname) and "visual" not in pname:
            assert (
                param.min() < 0 < param.max()
            ), f"{pname}: zero-centred norm weights must straddle 0"
    assert hf_model_class(tiny).__name__ == type(model).__name__
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        default = dict(hf_model_class(tiny)._from_config(hf_config(tiny)).named_parameters())
    same = [k for k, p in model.named_parameters() if torch.equal(p, default[k])]
    assert not same, f"parameters left at their default initialisation: {same[:5]}"


@pytest.mark.parametrize("name", [QWEN35_4B, QWEN35_35B])
def test_build_is_deterministic(load_config, name):
    tiny = tiny_config(load_config(name))
    a = build_hf_model(tiny, seed=1).state_dict()
    b = build_hf_model(tiny, seed=1).state_dict()
    c = build_hf_model(tiny, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name,tied", [(QWEN35_4B, True), (QWEN36_27B, False), (NEXT, False)])
def test_tied_embeddings_respected(load_config, name, tied):
    model = build_hf_model(tiny_config(load_config(name)), seed=0)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied


# --- layouts and MTP tensors --------------------------------------------------------------


def test_expert_layout_round_trip():
    packed = {
        "x.mlp.experts.gate_up_proj": torch.randn(3, 8, 5),
        "x.mlp.experts.down_proj": torch.randn(3, 5, 4),
        "x.mlp.gate.weight": torch.randn(3, 5),
    }
    per = unpack_experts(packed)
    assert experts_layout_of(per) == "per_expert" and experts_layout_of(packed) == "packed"
    assert torch.equal(
        per["x.mlp.experts.1.gate_proj.weight"], packed["x.mlp.experts.gate_up_proj"][1, :4]
    )
    assert torch.equal(
        per["x.mlp.experts.1.up_proj.weight"], packed["x.mlp.experts.gate_up_proj"][1, 4:]
    )
    assert torch.equal(
        per["x.mlp.experts.2.down_proj.weight"], packed["x.mlp.experts.down_proj"][2]
    )
    back = pack_experts(per)
    assert list(back) == list(packed) and all(torch.equal(back[k], packed[k]) for k in packed)
    del per["x.mlp.experts.2.up_proj.weight"]
    with pytest.raises(ValueError):
        pack_experts(per)


@pytest.mark.parametrize("name", MOE_CONFIGS)
@pytest.mark.parametrize("layout", ["packed", "per_expert"])
def test_mtp_tensors_names(load_config, name, layout):
    tiny = tiny_config(load_config(name))
    mtp = mtp_tensors(tiny, seed=3, experts_layout=layout)
    h = tiny["hidden_size"] if "hidden_size" in tiny else tiny["text_config"]["hidden_size"]
    assert mtp["mtp.fc.weight"].shape == (h, 2 * h)
    for key in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        assert mtp[f"mtp.{key}.weight"].shape == (h,)
    for key in (
        "self_attn.q_proj.weight",
        "mlp.gate.weight",
        "mlp.shared_expert_gate.weight",
        "mlp.shared_expert.up_proj.weight",
    ):
        assert f"mtp.layers.0.{key}" in mtp
    assert experts_layout_of(mtp) == layout
    assert not any("linear_attn" in k for k in mtp)
    again = mtp_tensors(tiny, seed=3, experts_layout=layout)
    assert all(torch.equal(mtp[k], again[k]) for k in mtp)


def test_mtp_tensors_dense_and_missing_layout(load_config):
    dense = mtp_tensors(tiny_config(load_config(QWEN36_27B)), seed=0, experts_layout=None)
    assert "mtp.layers.0.mlp.gate_proj.weight" in dense and experts_layout_of(dense) is None
    with pytest.raises(ValueError, match="experts_layout"):
        mtp_tensors(tiny_config(load_config(QWEN35_35B)), seed=0, experts_layout=None)


# --- files on disk ------------------------------------------------------------------------


def _check_files(path: Path, state: dict[str, torch.Tensor], shards: int) -> dict:
    index = read_index(path)
    files = sorted(set(index["weight_map"].values()))
    assert files == [shard_name(i, shards) for i in range(1, shards + 1)]
    assert sorted(p.name for p in path.glob("*.safetensors")) == files
    seen: dict[str, str] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == name and key not in seen
                seen[key] = name
    assert set(seen) == set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    on_disk = read_checkpoint(path)
    for key, tensor in state.items():
        assert on_disk[key].dtype == tensor.dtype and torch.equal(on_disk[key], tensor), key
    return index


def _reload(ckpt) -> None:
    model, info = type(ckpt.model).from_pretrained(
        ckpt.path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected, actual = ckpt.model.state_dict(), model.state_dict()
    assert set(expected) == set(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # from_pretrained leaves tensors as views of the mmap'd file, not 64-byte aligned; CPU matmul
    # results then differ in the last bit. Aligned copies make the forward bit-identical again.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    ids = _ids()
    assert torch.equal(
        reference_mtp_logits(model, ckpt.mtp, ids), reference_mtp_logits(ckpt.model, ckpt.mtp, ids)
    )


@pytest.mark.parametrize("name", DENSE_CONFIGS)
def test_vl_dense_checkpoint(load_config, tmp_path, name):
    ckpt = make_checkpoint(tmp_path, load_config(name), seed=5, shards=3)
    index = _check_files(tmp_path, ckpt.state, 3)
    keys = list(index["weight_map"])
    prefixes = ("model.language_model.", "model.visual.", "mtp.", "lm_head.weight")
    assert all(k.startswith(prefixes) for k in keys)
    assert any(k.startswith("model.visual.blocks.1.") for k in keys)
    assert ("lm_head.weight" in keys) is (not ckpt.config["tie_word_embeddings"])
    assert json.loads((tmp_path / "config.json").read_text()) == ckpt.config
    assert ckpt.config["text_config"]["dtype"] == "float32"
    _reload(ckpt)


@pytest.mark.parametrize("name", MOE_CONFIGS)
@pytest.mark.parametrize(
    "layout,mtp_layout", [("packed", "per_expert"), ("per_expert", "packed"), ("packed", "packed")]
)
def test_moe_checkpoint_layouts(load_config, tmp_path, name, layout, mtp_layout):
    ckpt = make_checkpoint(
        tmp_path, load_config(name), seed=2, experts_layout=layout, mtp_experts_layout=mtp_layout
    )
    _check_files(tmp_path, ckpt.state, 2)
    decoder = {k: v for k, v in ckpt.state.items() if not k.startswith("mtp.")}
    assert experts_layout_of(decoder) == layout and experts_layout_of(ckpt.mtp) == mtp_layout
    head = "model.language_model.layers.0" if name == QWEN35_35B else "model.layers.0"
    if layout == "packed":
        assert ckpt.state[f"{head}.mlp.experts.gate_up_proj"].shape == (4, 64, 64)
        assert ckpt.state[f"{head}.mlp.experts.down_proj"].shape == (4, 64, 32)
    else:
        assert ckpt.state[f"{head}.mlp.experts.3.gate_proj.weight"].shape == (32, 64)
        assert ckpt.state[f"{head}.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    _reload(ckpt)


@pytest.mark.parametrize("name", [QWEN36_27B, QWEN35_35B])
@pytest.mark.parametrize("prefix", [None, "model.language_model"])
def test_text_only_prefixes(load_config, tmp_path, name, prefix):
    ckpt = make_checkpoint(
        tmp_path,
        load_config(name),
        seed=1,
        text_only=True,
        text_prefix=prefix,
        experts_layout="per_expert",
    )
    keys = list(_check_files(tmp_path, ckpt.state, 2)["weight_map"])
    want = prefix or "model"
    assert (
        f"{want}.layers.0.input_layernorm.weight" in keys and f"{want}.embed_tokens.weight" in keys
    )
    assert not any("visual" in k for k in keys)
    assert type(ckpt.model).__name__.endswith("ForCausalLM")
    _reload(ckpt)


def test_qwen3_next_rejects_text_prefix(load_config, tmp_path):
    with pytest.raises(ValueError, match="text_prefix"):
        make_checkpoint(tmp_path, load_config(NEXT), text_prefix="model.language_model")


def test_tied_checkpoint_has_no_lm_head(load_config, tmp_path):
    ckpt = make_checkpoint(
        tmp_path, load_config(NEXT), seed=0, tie=True, experts_layout="per_expert"
    )
    assert "lm_head.weight" not in ckpt.state
    _reload(ckpt)


def test_mtp_in_separate_shard_and_single_file(load_config, tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "a",
        load_config(QWEN35_35B),
        shards=3,
        mtp_in_separate_shard=True,
        mtp_experts_layout="per_expert",
    )
    index = _check_files(tmp_path / "a", ckpt.state, 3)
    last = shard_name(3, 3)
    assert {k for k, f in index["weight_map"].items() if f == last} == {
        k for k in ckpt.state if k.startswith("mtp.")
    }
    single = make_checkpoint(tmp_path / "b", load_config(QWEN35_4B), shards=1)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert set(read_checkpoint(tmp_path / "b")) == set(single.state)


# --- reference MTP ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [QWEN36_27B, QWEN35_35B, NEXT])
def test_reference_mtp_logits(load_config, tmp_path, name):
    ckpt = make_checkpoint(
        tmp_path,
        load_config(name),
        seed=4,
        experts_layout="packed",
        mtp_experts_layout="per_expert",
    )
    ids = _ids(seq=9)
    logits = reference_mtp_logits(ckpt.model, ckpt.mtp, ids)
    assert logits.shape == (2, 9, 256) and torch.isfinite(logits).all()
    assert torch.equal(logits, reference_mtp_logits(ckpt.model, ckpt.mtp, ids))
    repacked = pack_experts(ckpt.mtp)
    assert torch.equal(logits, reference_mtp_logits(ckpt.model, repacked, ids))
    # Position t sees tokens <= t+1 only; the last position embeds the zero fill, not a token.
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % 256
    other = reference_mtp_logits(ckpt.model, ckpt.mtp, changed)
    # (MoE: another token's route changes the expert batches, hence a last-bit tolerance.)
    torch.testing.assert_close(logits[:, :-2], other[:, :-2], atol=1e-5, rtol=0)
    assert (logits[:, -2] - other[:, -2]).abs().max() > 1e-3
    # The MTP weights matter: changing the MTP norm changes the logits.
    bumped = dict(ckpt.mtp, **{"mtp.norm.weight": ckpt.mtp["mtp.norm.weight"] + 0.5})
    assert not torch.allclose(logits, reference_mtp_logits(ckpt.model, bumped, ids))


# --- FP8 ----------------------------------------------------------------------------------


def test_fp8_checkpoint(load_config, tmp_path):
    source = load_config(NEXT_FP8)
    ckpt = make_checkpoint(
        tmp_path, source, seed=0, experts_layout="per_expert", mtp_experts_layout="per_expert"
    )
    quant = ckpt.config["quantization_config"]
    assert quant["weight_block_size"] == [16, 16] and quant["fmt"] == "e4m3"
    modules = {name for name, _ in ckpt.model.named_modules()}
    modules |= {name for name, _ in ckpt.model.named_parameters()}
    per_layer = [m for m in quant["modules_to_not_convert"] if m.startswith("model.layers.")]
    assert per_layer and all(m in modules for m in per_layer)
    assert {m for m in quant["modules_to_not_convert"] if m.startswith("mtp.")} == {
        m for m in source["quantization_config"]["modules_to_not_convert"] if m.startswith("mtp.")
    }
    state = ckpt.state
    _check_files(tmp_path, state, 2)
    q = state["model.layers.3.self_attn.q_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn and state[
        "model.layers.3.self_attn.q_proj.weight_scale_inv"
    ].shape == (
        q.shape[0] // 16,
        q.shape[1] // 16,
    )
    assert state["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert state["mtp.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    for kept in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.linear_attn.in_proj_ba.weight",
        "model.layers.0.mlp.gate.weight",
        "mtp.fc.weight",
    ):
        assert (
            state[kept].dtype == torch.float32
            and kept.replace(".weight", ".weight_scale_inv") not in state
        )
    # The model and MTP tensors returned are the dequantised file: an exact reference.
    from tests.support.checkpoints import checkpoint_state
    from tests.support.fp8 import dequantize_fp8_blockwise

    real = dequantize_fp8_blockwise(state, block=16)
    expected = checkpoint_state(ckpt.config, ckpt.model, ckpt.mtp, experts_layout="per_expert")
    assert set(real) == set(expected) and all(torch.equal(real[k], expected[k]) for k in expected)


def test_fp8_partial_blocks_and_scale_dtype():
    w = torch.randn(20, 40, generator=torch.Generator().manual_seed(0))
    out = quantize_fp8_blockwise(
        {"a.proj.weight": w, "a.norm.weight": torch.randn(40)}, block=16, scale_dtype=torch.bfloat16
    )
    scale = out["a.proj.weight_scale_inv"]
    assert (
        scale.shape == (2, 3)
        and scale.dtype == torch.bfloat16
        and "a.norm.weight_scale_inv" not in out
    )
    from tests.support.fp8 import dequantize_fp8_blockwise

    back = dequantize_fp8_blockwise(out, block=16)["a.proj.weight"]
    # e4m3 keeps 3 mantissa bits (relative error <= 1/16); values under 2**-6 of a tile's scale
    # are subnormal, with an absolute error of at most half their step, 2**-10 * scale.
    tile_scale = scale.float().repeat_interleave(16, 0)[:20].repeat_interleave(16, 1)[:, :40]
    assert ((back - w).abs() <= w.abs() / 16 + tile_scale / 2**10).all()
