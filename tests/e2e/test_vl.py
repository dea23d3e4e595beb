"""Vision-language bridges end to end: HF checkpoint -> `codegen convert` -> the Megatron VL model
(vision tower + language model with interleaved mRoPE) loaded from the converted files -> vision
features, logits and MTP logits equal HF's on a prompt holding two images of different grids (and
on one holding an image and a video) -> export bit-identical; the same at TP=2; `codegen verify`.

Tiny dense-VL and MoE-VL models derived from real configs, every parameter random, with MTP.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen35_bridge.formats.safetensors.reader import CheckpointReader
from qwen35_bridge.megatron.vl.multimodal import MultimodalInputs
from qwen35_bridge.reference.vl import (
    VISION_TOKEN_KEYS,
    hf_vl_logits,
    reference_vl_mtp_logits,
    synthetic_prompt,
)
from qwen35_codegen import catalog
from qwen35_codegen.cli.main import main
from qwen35_codegen.registry.lookup import bridge_for_checkpoint
from tests.support import TinyCheckpoint, make_checkpoint

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

TOLERANCE = 1e-4
# Two images, (t, h, w) in patches: 6 and 12 vision tokens after the 2 x 2 merge, grids of
# different shapes (both unlike the 8 x 8 position table, so it is resampled).
GRIDS = ((1, 4, 6), (1, 6, 8))
TEXT_TOKENS = 66  # 88 tokens in all: GDN's chunked delta rule spans two chunks of 64

VARIANTS = {
    "dense-vl": ("Qwen/Qwen3.6-27B", {}),
    "moe-vl": (
        "Qwen/Qwen3.5-35B-A3B",
        {"experts_layout": "packed", "mtp_experts_layout": "per_expert"},
    ),
}


@dataclass(frozen=True)
class Converted:
    checkpoint: TinyCheckpoint
    megatron_dir: Path
    bridge_dir: Path
    bridge: Any
    inputs: MultimodalInputs


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def converted(request, tmp_path_factory) -> Converted:
    tmp = tmp_path_factory.mktemp(request.param)
    model_id, options = VARIANTS[request.param]
    checkpoint = make_checkpoint(tmp / "hf", catalog.entry(model_id).config, seed=17, **options)
    bridges = tmp / "bridges"
    assert (
        main(
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
        == 0
    )
    bridge, _spec, _ = bridge_for_checkpoint(checkpoint.path, bridge_dir=bridges, quiet=True)
    inputs = synthetic_prompt(checkpoint.config, GRIDS, text_tokens=TEXT_TOKENS, seed=2)
    return Converted(checkpoint, tmp / "megatron", bridges, bridge, inputs)


@pytest.fixture
def vl_model(converted: Converted):
    """The Megatron VL model (TP=1) loaded from the converted Megatron files."""
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel

    parallel = init_parallel()
    try:
        model = converted.bridge.build_vl_model(**parallel)
        converted.bridge.load_megatron(model, converted.megatron_dir)
        yield model
    finally:
        destroy_parallel()


def max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_prompt_holds_two_images_of_different_grids(converted: Converted) -> None:
    types = converted.inputs.mm_token_type_ids[0].tolist()
    assert types.count(1) == 6 + 12 and types.count(2) == 0
    assert converted.inputs.pixel_values.shape[0] == 4 * 6 + 6 * 8


def test_vision_features_before_and_after_the_merger_equal_hf(
    converted: Converted, vl_model
) -> None:
    inputs = converted.inputs
    with torch.no_grad():
        expected = converted.checkpoint.model.model.visual(
            inputs.pixel_values, grid_thw=inputs.image_grid_thw
        )
        got = vl_model.vision_model(inputs.pixel_values, inputs.image_grid_thw)
    assert max_delta(got.patches, expected.last_hidden_state) <= TOLERANCE
    assert max_delta(got.tokens, expected.pooler_output) <= TOLERANCE


def test_logits_and_mtp_logits_equal_hf(converted: Converted, vl_model) -> None:
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

    logits, mtp = vl_forward_logits(vl_model, converted.inputs)
    model = converted.checkpoint.model
    assert max_delta(logits, hf_vl_logits(model, converted.inputs)) <= TOLERANCE
    assert len(mtp) == 1
    assert (
        max_delta(
            mtp[0], reference_vl_mtp_logits(model, converted.checkpoint.mtp, converted.inputs)
        )
        <= TOLERANCE
    )


def test_placeholders_without_pixels_are_named(converted: Converted, vl_model) -> None:
    inputs = dataclasses.replace(converted.inputs, pixel_values=None)
    with pytest.raises(ValueError, match="18 image placeholders but no image pixels and grid"):
        vl_model.embed(inputs)


def image_and_video_prompt(config: dict[str, Any]) -> MultimodalInputs:
    """Text, an image of 2 x 3 vision tokens, text, a video of two 2 x 2 frames (each frame its
    own run between markers, timestamps as text between them), text: 88 tokens."""
    gen = torch.Generator().manual_seed(4)
    start, end = config["vision_start_token_id"], config["vision_end_token_id"]
    high = min(config[key] for key in VISION_TOKEN_KEYS)

    def text(n: int) -> list[int]:
        return torch.randint(0, high, (n,), generator=gen).tolist()

    frame = [start, *[config["video_token_id"]] * 4, end]
    ids = (
        text(10)
        + [start, *[config["image_token_id"]] * 6, end]
        + text(5)
        + frame
        + text(3)
        + frame
        + text(50)
    )
    vision = config["vision_config"]
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    return MultimodalInputs.from_token_ids(
        torch.tensor([ids]),
        image_token_id=config["image_token_id"],
        video_token_id=config["video_token_id"],
        pixel_values=torch.randn(4 * 6, patch_dim, generator=gen),
        image_grid_thw=torch.tensor([[1, 4, 6]]),
        pixel_values_videos=torch.randn(2 * 4 * 4, patch_dim, generator=gen),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
    )


@pytest.mark.parametrize("converted", ["dense-vl"], indirect=True)
def test_image_and_video_logits_equal_hf(converted: Converted, vl_model) -> None:
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

    inputs = image_and_video_prompt(converted.checkpoint.config)
    logits, mtp = vl_forward_logits(vl_model, inputs)
    model = converted.checkpoint.model
    assert max_delta(logits, hf_vl_logits(model, inputs)) <= TOLERANCE
    assert (
        max_delta(mtp[0], reference_vl_mtp_logits(model, converted.checkpoint.mtp, inputs))
        <= TOLERANCE
    )


def test_megatron_contiguous_mrope_sections_give_other_logits(
    converted: Converted, vl_model
) -> None:
    """Negative control: megatron-core's own multimodal rotary embedding (contiguous sections)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
    )

    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

    gpt_args = converted.bridge.gpt_model_args
    vl_model.language_model.rotary_pos_emb = MultimodalRotaryEmbedding(
        kv_channels=vl_model.config.kv_channels,
        rotary_percent=gpt_args["rotary_percent"],
        rotary_base=gpt_args["rotary_base"],
    )
    logits, _ = vl_forward_logits(vl_model, converted.inputs)
    # Small rotary angles in a tiny model (theta 1e7, 4 frequencies), yet ten times the tolerance.
    assert (
        max_delta(logits, hf_vl_logits(converted.checkpoint.model, converted.inputs))
        > 10 * TOLERANCE
    )


def test_export_is_bit_identical_to_the_hf_files(converted: Converted, vl_model) -> None:
    exported = converted.bridge.export_hf(vl_model)
    with CheckpointReader(converted.checkpoint.path) as original:
        assert set(exported) == original.names()
        assert any(name.startswith("model.visual.") for name in exported)
        for name in original.names():
            a, b = original.get(name), exported[name]
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert (
                a.contiguous().view(torch.uint8).numpy().tobytes()
                == b.contiguous().view(torch.uint8).numpy().tobytes()
            ), name


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("converted", ["dense-vl"], indirect=True)
def test_tp2_logits_equal_hf(converted: Converted, sequence_parallel: bool) -> None:
    from qwen35_bridge.megatron.ranks import run_ranks
    from tests.support.ranks import vl_logits_on_rank

    ck = converted.checkpoint
    expected = hf_vl_logits(ck.model, converted.inputs)
    expected_mtp = reference_vl_mtp_logits(ck.model, ck.mtp, converted.inputs)
    results = run_ranks(
        partial(vl_logits_on_rank, tp=2, sequence_parallel=sequence_parallel),
        2,
        ck.path,
        converted.megatron_dir,
        converted.bridge_dir,
        converted.inputs,
    )
    for logits, mtp in results:
        assert max_delta(torch.from_numpy(logits), expected) <= TOLERANCE
        assert max_delta(torch.from_numpy(mtp[0]), expected_mtp) <= TOLERANCE


@pytest.mark.parametrize("converted", ["dense-vl"], indirect=True)
def test_verify_puts_an_image_in_the_prompt(
    converted: Converted, tmp_path: Path, capsys, monkeypatch
) -> None:
    """`codegen verify` passes, then fails once a tensor only the image reaches is wrong."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hf_dir, megatron = str(converted.checkpoint.path), tmp_path / "megatron"
    shutil.copytree(converted.megatron_dir, megatron)
    assert main(["verify", hf_dir, str(megatron)]) == 0
    assert "PASS" in capsys.readouterr().out
    name = "vision_model.merger.linear_fc2.bias"
    with CheckpointReader(megatron) as reader:
        shard = megatron / reader.file(name)
    tensors = load_file(shard)
    tensors[name] = tensors[name] + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["verify", hf_dir, str(megatron)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["verify", hf_dir, str(megatron), "--tokens", "8"]) == 2
    assert "--tokens 8: a VL prompt needs more than 8 tokens" in capsys.readouterr().err


def test_a_text_only_bridge_has_no_vl_model() -> None:
    from qwen35_bridge.generated import load_bridge

    with pytest.raises(ValueError, match="Qwen/Qwen3-Next-80B-A3B-Instruct is a text-only model"):
        load_bridge("Qwen/Qwen3-Next-80B-A3B-Instruct")().build_vl_model()


def test_torch_dist_of_the_vl_model_restores_and_round_trips(
    converted: Converted, tmp_path: Path
) -> None:
    """The whole VL checkpoint (vision tower too) as torch_dist: megatron-core's
    dist_checkpointing.load restores it into the VL model with HF's logits, and it reads back to
    bit-identical HF files."""
    from megatron.core import dist_checkpointing

    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_bridge.megatron.vl.multimodal import vl_forward_logits

    args = ["--bridge-dir", str(converted.bridge_dir), "--quiet"]
    assert (
        main(
            [
                "convert",
                "hf-to-megatron",
                str(converted.checkpoint.path),
                str(tmp_path / "dist"),
                "--format",
                "torch_dist",
                *args,
            ]
        )
        == 0
    )
    parallel = init_parallel()
    try:
        model = converted.bridge.build_vl_model(**parallel)
        iteration = tmp_path / "dist" / "release"  # the run tree's iteration folder
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(iteration))
        result = model.load_state_dict(state["model"], strict=False)
        assert (
            not [k for k in result.missing_keys if not k.endswith("_extra_state")]
            and not result.unexpected_keys
        )
        logits, _mtp = vl_forward_logits(model, converted.inputs)
    finally:
        destroy_parallel()
    assert (
        max_delta(logits, hf_vl_logits(converted.checkpoint.model, converted.inputs)) <= TOLERANCE
    )
    assert (
        main(["convert", "megatron-to-hf", str(tmp_path / "dist"), str(tmp_path / "back"), *args])
        == 0
    )
    with (
        CheckpointReader(converted.checkpoint.path) as original,
        CheckpointReader(tmp_path / "back") as back,
    ):
        assert back.names() == original.names()
        assert all(
            torch.equal(original.get(n), back.get(n)) and original.dtype(n) == back.dtype(n)
            for n in original.names()
        )
