"""FP8 block-quantised checkpoints (docs/reference.md section 6): dequantised on import with every scale
consumed, exported in bf16 (config without quantization_config) or, on request, in FP8 again."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from qwen35_bridge.formats.record import Record
from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import (
    dequantize_fp8_blockwise,
    make_checkpoint,
    reference_mtp_logits,
)

BLOCK = 16  # the tiny config's weight_block_size
RELEASE = "Qwen/Qwen3-Next-80B-A3B-Instruct-FP8"
# A scope that quantises the decoder's routed experts only, written as releases write it:
# regexes and suffixes, matched by transformers' rule (qwen35_bridge.formats.fp8.not_converted).
EXPERTS_ONLY = [
    "lm_head",
    r"model\.layers\.\d+\.(self_attn|linear_attn)",
    r"model\.layers\.\d+\.mlp\.shared_expert",
    "mlp.gate",
    "mlp.shared_expert_gate",
    "mtp",
]
ROUTED_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def scoped_config(scope: str) -> dict:
    config = copy.deepcopy(catalog.entry(RELEASE).config)
    if scope == "experts-only":
        config["quantization_config"]["modules_to_not_convert"] = EXPERTS_ONLY
    return config


@pytest.fixture(scope="module", params=["release", "experts-only"])
def fp8(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fp8-{request.param}")
    config = scoped_config(request.param)
    checkpoint = make_checkpoint(
        tmp / "hf", config, seed=8, experts_layout="per_expert", dtype=torch.bfloat16
    )
    args = ["--bridge-dir", str(tmp / "bridges"), "--quiet"]
    assert (
        main(["convert", "hf-to-megatron", str(checkpoint.path), str(tmp / "megatron"), *args]) == 0
    )
    assert main(["convert", "megatron-to-hf", str(tmp / "megatron"), str(tmp / "bf16"), *args]) == 0
    assert (
        main(["convert", "megatron-to-hf", str(tmp / "megatron"), str(tmp / "fp8"), "--fp8", *args])
        == 0
    )
    return tmp, checkpoint


def test_the_source_really_is_fp8(fp8):
    _tmp, checkpoint = fp8
    with CheckpointReader(checkpoint.path) as reader:
        quantized = [n for n in reader.names() if reader.dtype(n) == torch.float8_e4m3fn]
        scales = [n for n in reader.names() if n.endswith("_scale_inv")]
    assert quantized and len(quantized) == len(scales)
    assert json.loads((checkpoint.path / "config.json").read_text())["quantization_config"][
        "weight_block_size"
    ] == [BLOCK, BLOCK]


def test_an_experts_only_scope_quantises_exactly_the_routed_experts(tmp_path: Path):
    checkpoint = make_checkpoint(
        tmp_path / "hf",
        scoped_config("experts-only"),
        seed=3,
        experts_layout="per_expert",
        dtype=torch.bfloat16,
    )
    with CheckpointReader(checkpoint.path) as reader:
        quantized = {n for n in reader.names() if reader.dtype(n) == torch.float8_e4m3fn}
        weights = {n for n in reader.names() if n.endswith(".weight")}
    assert quantized == {n for n in weights if ROUTED_EXPERT.match(n)} and quantized


def test_record_lists_the_fp8_tensors(fp8):
    tmp, checkpoint = fp8
    with CheckpointReader(checkpoint.path) as reader:
        expected = sorted(n for n in reader.names() if reader.dtype(n) == torch.float8_e4m3fn)
    assert list(Record.read(tmp / "megatron").fp8_tensors) == expected


def test_bf16_export_equals_an_independent_dequantisation(fp8):
    tmp, checkpoint = fp8
    expected = dequantize_fp8_blockwise(checkpoint.state, block=BLOCK, dtype=torch.bfloat16)
    with CheckpointReader(tmp / "bf16") as exported:
        assert exported.names() == set(expected)
        for name, tensor in expected.items():
            got = exported.get(name)
            assert got.dtype == tensor.dtype == torch.bfloat16 and torch.equal(got, tensor), name
    assert "quantization_config" not in json.loads((tmp / "bf16" / "config.json").read_text())


def test_fp8_export_quantises_the_same_tensors_again(fp8):
    tmp, checkpoint = fp8
    with CheckpointReader(checkpoint.path) as original, CheckpointReader(tmp / "fp8") as exported:
        assert exported.names() == original.names()
        for name in original.names():
            assert exported.dtype(name) == original.dtype(name) and exported.shape(
                name
            ) == original.shape(name), name
    with CheckpointReader(tmp / "fp8") as exported:
        again = dequantize_fp8_blockwise(
            {n: exported.get(n) for n in checkpoint.state}, block=BLOCK, dtype=torch.float32
        )
    first = dequantize_fp8_blockwise(checkpoint.state, block=BLOCK, dtype=torch.float32)
    for name, tensor in first.items():
        assert torch.allclose(
            again[name], tensor, rtol=0.07, atol=1e-6
        ), name  # within e4m3 rounding
    assert (
        json.loads((tmp / "fp8" / "config.json").read_text())["quantization_config"]["fmt"]
        == "e4m3"
    )


def test_converted_fp8_model_computes_the_dequantised_model(fp8):
    from qwen35_bridge.megatron.gpt import forward_logits
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    tmp, checkpoint = fp8
    bridge, spec, _ = bridge_for_checkpoint(checkpoint.path, bridge_dir=tmp / "bridges", quiet=True)
    ids = torch.randint(0, spec.vocab_size, (1, 80), generator=torch.Generator().manual_seed(2))
    hf = checkpoint.model.float().eval()
    mtp = {k: v.float() for k, v in checkpoint.mtp.items()}
    with torch.no_grad():
        expected, expected_mtp = hf(input_ids=ids).logits, reference_mtp_logits(hf, mtp, ids)
    parallel = init_parallel()
    try:
        model = bridge.build_model(**parallel)
        bridge.load_megatron(model, tmp / "megatron")
        logits, mtp_logits = forward_logits(model, ids)
    finally:
        destroy_parallel()
    # The exact weights are checked above; here the two fp32 forwards of a random MoE model differ by
    # fp32 noise (reduction orders), measured at 1.2e-4 on this seed: allow 5e-4.
    assert (logits - expected).abs().max().item() <= 5e-4
    assert (mtp_logits[0] - expected_mtp).abs().max().item() <= 5e-4


def test_fp8_export_needs_an_fp8_source(tmp_path: Path, capsys):
    checkpoint = make_checkpoint(
        tmp_path / "hf", catalog.entry("Qwen/Qwen3.6-27B").config, seed=1, text_only=True
    )
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
                "--fp8",
                *args,
            ]
        )
        == 2
    )
    assert "was not converted from an FP8 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_fp8_export_in_another_expert_layout_is_refused(fp8, tmp_path: Path, capsys):
    """The recorded FP8 tensors are per-expert names; a packed export would leave them bf16."""
    tmp, _checkpoint = fp8
    args = ["--bridge-dir", str(tmp / "bridges"), "--quiet", "--fp8", "--experts", "packed"]
    destination = tmp_path / "packed"
    assert main(["convert", "megatron-to-hf", str(tmp / "megatron"), str(destination), *args]) == 2
    err = capsys.readouterr().err
    assert "quantised in the FP8 source but not a tensor of this export" in err, err
    assert not destination.exists()


def test_dequantizing_to_float32_names_the_mixed_group_and_the_fix(fp8, tmp_path: Path, capsys):
    """Qwen3-Next converts the FP8 in_proj_qkvz together with the bf16 in_proj_ba."""
    _tmp, checkpoint = fp8
    destination = tmp_path / "m"
    args = ["convert", "hf-to-megatron", str(checkpoint.path), str(destination), "--quiet"]
    code = main([*args, "--dequantize-to", "float32", "--bridge-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    with CheckpointReader(checkpoint.path) as reader:
        mixed = (
            reader.dtype("model.layers.0.linear_attn.in_proj_qkvz.weight") == torch.float8_e4m3fn
        )
    if not mixed:  # experts only: every group is all FP8 or all bf16, so float32 is possible
        assert code == 0, err
        return
    assert code == 2
    assert "in_proj_qkvz.weight is dequantised to torch.float32" in err, err
    assert "pass --dequantize-to bfloat16" in err
    assert not destination.exists()
