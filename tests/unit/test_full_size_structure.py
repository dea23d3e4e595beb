"""Every committed full-size bridge, checked structurally at full size on the meta device (no
memory): the HF model's parameters and the megatron-core model's parameters are exactly the
bridge's tensors, with the bridge's shapes."""

from __future__ import annotations

import os
import re

import pytest
import torch

from qwen35_codegen import catalog
from tests.support import hf_config, hf_model_class

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

MODEL_IDS = sorted(catalog.model_ids())
PACKED = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")


def bridge_of(model_id: str):
    from qwen35_bridge.generated import load_bridge

    return load_bridge(model_id)()


def hf_on_disk_shapes(model_id: str, experts_layout: str | None) -> dict[str, tuple[int, ...]]:
    """The HF model's parameters (built on meta) under the names and layout the checkpoint uses."""
    config = catalog.entry(model_id).config
    with torch.device("meta"):
        model = hf_model_class(config)(hf_config(config))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters():
        match = PACKED.match(name)
        if match and experts_layout == "per_expert":
            experts, rows, cols = param.shape
            if match.group(2) == "gate_up_proj":
                for e in range(experts):
                    shapes[f"{match.group(1)}{e}.gate_proj.weight"] = (rows // 2, cols)
                    shapes[f"{match.group(1)}{e}.up_proj.weight"] = (rows // 2, cols)
            else:
                for e in range(experts):
                    shapes[f"{match.group(1)}{e}.down_proj.weight"] = (rows, cols)
        else:
            shapes[name] = tuple(param.shape)
    return shapes


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_hf_model_matches_the_bridge(model_id: str) -> None:
    bridge = bridge_of(model_id)
    spec_layout = (
        "per_expert"
        if any(".experts.0.gate_proj" in k and not k.startswith("mtp.") for k in bridge.hf_shapes)
        else "packed"
    )
    hf = hf_on_disk_shapes(model_id, spec_layout)
    decoder_side = {k: v for k, v in bridge.hf_shapes.items() if not k.startswith("mtp.")}
    assert set(decoder_side) == set(hf), (
        sorted(set(decoder_side) - set(hf))[:3],
        sorted(set(hf) - set(decoder_side))[:3],
    )
    for name, shape in hf.items():
        assert decoder_side[name] == shape, name


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_mtp_layer_has_the_last_decoder_layers_shapes(model_id: str) -> None:
    """transformers has no MTP module: the MTP layer is held against the last decoder layer."""
    bridge = bridge_of(model_id)
    last = max(
        int(m.group(1))
        for k in bridge.hf_shapes
        if (m := re.search(r"layers\.(\d+)\.", k)) and not k.startswith("mtp.")
    )
    prefix = next(k for k in bridge.hf_shapes if k.endswith("embed_tokens.weight")).removesuffix(
        "embed_tokens.weight"
    )
    decoder = {
        k.removeprefix(f"{prefix}layers.{last}."): v
        for k, v in bridge.hf_shapes.items()
        if k.startswith(f"{prefix}layers.{last}.")
    }
    mtp_layer = {
        k.removeprefix("mtp.layers.0."): v
        for k, v in bridge.hf_shapes.items()
        if k.startswith("mtp.layers.0.")
    }
    canonical = lambda shapes: sorted(
        v for k, v in shapes.items()
    )  # noqa: E731 - layouts may differ in names
    assert sum(torch.Size(s).numel() for s in decoder.values()) == sum(
        torch.Size(s).numel() for s in mtp_layer.values()
    )
    assert {k for k in mtp_layer if ".experts." not in k} == {
        k for k in decoder if ".experts." not in k
    }
    assert canonical({k: v for k, v in mtp_layer.items() if ".experts." not in k}) == canonical(
        {k: v for k, v in decoder.items() if ".experts." not in k}
    )
    hidden = bridge.hf_shapes[f"{prefix}norm.weight"][0]
    assert bridge.hf_shapes["mtp.fc.weight"] == (hidden, 2 * hidden)


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_megatron_model_matches_the_bridge(model_id: str) -> None:
    from qwen35_bridge.megatron.live import global_parameters
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    bridge = bridge_of(model_id)
    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = bridge.build_model(**parallel)
        prefix = bridge.megatron_prefix
        params = {
            k: tuple(copies[0].shape) for k, copies in global_parameters(model, prefix).items()
        }
    finally:
        destroy_parallel()
    expected = {k: v for k, v in bridge.megatron_shapes.items() if k.startswith(prefix)}
    assert set(params) == set(expected), (
        sorted(set(params) - set(expected))[:3],
        sorted(set(expected) - set(params))[:3],
    )
    for name, shape in expected.items():
        assert params[name] == shape, name


VL_MODEL_IDS = [m for m in MODEL_IDS if bridge_of(m).vision_model_args is not None]


@pytest.mark.parametrize("model_id", VL_MODEL_IDS)
def test_megatron_vl_model_matches_the_bridge(model_id: str) -> None:
    """The whole VL model: the vision tower's tensors and the language model's, nothing else."""
    from qwen35_bridge.megatron.live import global_parameters
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    bridge = bridge_of(model_id)
    parallel = init_parallel()
    try:
        with torch.device("meta"):
            model = bridge.build_vl_model(**parallel)
        params = {k: tuple(copies[0].shape) for k, copies in global_parameters(model, "").items()}
    finally:
        destroy_parallel()
    expected = bridge.megatron_shapes
    assert set(params) == set(expected), (
        sorted(set(params) - set(expected))[:3],
        sorted(set(expected) - set(params))[:3],
    )
    assert any(name.startswith("vision_model.decoder.layers.") for name in params)
    for name, shape in expected.items():
        assert params[name] == shape, name
