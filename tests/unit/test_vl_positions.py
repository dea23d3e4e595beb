"""Where tokens and patches sit, against transformers' own functions: the language model's mRoPE
position ids (text, images, video frames) and interleaved rotary angles, and the vision tower's
position table resampling, 2-D rotary angles and per-frame attention segments."""

from __future__ import annotations

import pytest
import torch
from transformers import vision_utils
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen

from qwen35_bridge.megatron.vl import grid as vision_grid
from qwen35_bridge.megatron.vl import mrope
from qwen35_codegen import catalog
from tests.support import hf_config, tiny_config

T, I, V = mrope.TEXT, mrope.IMAGE, mrope.VIDEO


def runs(*pieces: tuple[int, int]) -> list[int]:
    """Token types from (type, count) runs."""
    return [kind for kind, count in pieces for _ in range(count)]


def hf_rope_index(types: torch.Tensor, image_grid_thw, video_grid_thw) -> torch.Tensor:
    config = hf_config(tiny_config(catalog.entry("Qwen/Qwen3.6-27B").config))
    with torch.device("meta"):
        model = hf_qwen.Qwen3_5Model(config)
    positions, _ = model.get_rope_index(
        torch.zeros_like(types), types, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw
    )
    return positions


def test_position_ids_equal_hf_for_text_images_and_video_frames() -> None:
    images = torch.tensor([[1, 4, 6], [1, 6, 2], [1, 2, 2]])
    videos = torch.tensor([[2, 4, 4]])  # two frames of 2 x 2 merged tokens, each its own run
    row0 = runs((T, 3), (I, 6), (T, 2), (V, 4), (T, 1), (V, 4), (T, 5))
    row1 = runs((T, 1), (I, 3), (T, 4), (I, 1), (T, 16))
    types = torch.tensor([row0, row1])
    got = mrope.position_ids(
        types, spatial_merge_size=2, image_grid_thw=images, video_grid_thw=videos
    )
    assert torch.equal(got, hf_rope_index(types, images, videos))
    # Text after an image resumes at its start + max(h, w) merged: 3 + 3 = 6.
    assert got[:, 0, 9].tolist() == [6, 6, 6]


def test_text_only_positions_count_on() -> None:
    got = mrope.position_ids(torch.zeros(2, 5, dtype=torch.long), spatial_merge_size=2)
    assert torch.equal(got, torch.arange(5).expand(3, 2, 5))


@pytest.mark.parametrize(
    ("types", "images", "message"),
    [
        (runs((T, 2), (I, 5)), [[1, 4, 6]], "has 5 tokens, but its grid"),
        (runs((T, 2), (I, 6), (T, 1), (I, 6)), [[1, 4, 6]], "has no grid left"),
        (runs((T, 2), (I, 6)), [[1, 4, 6], [1, 2, 2]], "1 image grid(s) have no placeholder run"),
        (runs((T, 2), (3, 1)), [[1, 4, 6]], "holds [3]"),
    ],
)
def test_position_ids_name_what_does_not_match(
    types: list[int], images: list[list[int]], message: str
) -> None:
    with pytest.raises(ValueError) as error:
        mrope.position_ids(
            torch.tensor([types]), spatial_merge_size=2, image_grid_thw=torch.tensor(images)
        )
    assert message in str(error.value)


def test_frequency_axes_follow_the_rule_by_hand() -> None:
    assert mrope.frequency_axes((2, 1, 1)) == [0, 1, 2, 0]
    assert mrope.frequency_axes((4, 1, 0)) == [0, 1, 0, 0, 0]
    axes = mrope.frequency_axes((11, 11, 10))
    assert axes[:7] == [0, 1, 2, 0, 1, 2, 0] and axes[-3:] == [2, 0, 1]
    assert [axes.count(a) for a in (0, 1, 2)] == [11, 11, 10]


@pytest.mark.parametrize("model_id", ["Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-35B-A3B"])
@pytest.mark.parametrize("tiny", [True, False])
def test_interleaved_mrope_angles_equal_hf_rotary(model_id: str, tiny: bool) -> None:
    raw = catalog.entry(model_id).config
    text = hf_config(tiny_config(raw) if tiny else raw).text_config
    rope = text.rope_parameters
    positions = torch.randint(0, 300, (3, 2, 17), generator=torch.Generator().manual_seed(0))
    hf_cos, hf_sin = hf_qwen.Qwen3_5TextRotaryEmbedding(text)(
        torch.zeros(1, dtype=torch.float32), positions
    )
    module = mrope.InterleavedMRoPE(
        kv_channels=text.head_dim,
        rotary_percent=rope["partial_rotary_factor"],
        rotary_base=rope["rope_theta"],
    )
    angles = module(positions, rope["mrope_section"]).squeeze(2).transpose(0, 1)  # [b, s, rot]
    assert torch.allclose(angles.cos(), hf_cos, atol=1e-6) and torch.allclose(
        angles.sin(), hf_sin, atol=1e-6
    )


def test_megatron_contiguous_sections_differ_from_hf() -> None:
    """docs/reference.md section 8: megatron-core's multimodal rotary embedding is not Qwen3.5's."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
    )

    from qwen35_bridge.megatron.shims import install_cpu_shims

    install_cpu_shims()
    text = hf_config(catalog.entry("Qwen/Qwen3.6-27B").config).text_config
    rope = text.rope_parameters
    positions = torch.randint(0, 300, (3, 1, 17), generator=torch.Generator().manual_seed(0))
    hf_cos, _ = hf_qwen.Qwen3_5TextRotaryEmbedding(text)(torch.zeros(1), positions)
    contiguous = MultimodalRotaryEmbedding(
        kv_channels=text.head_dim,
        rotary_percent=rope["partial_rotary_factor"],
        rotary_base=rope["rope_theta"],
    )
    angles = contiguous(positions, list(rope["mrope_section"])).squeeze(2).transpose(0, 1)
    assert (angles.cos() - hf_cos).abs().max() > 0.5


GRIDS = torch.tensor([[1, 4, 6], [2, 6, 4], [1, 2, 2]])  # an image, a two-frame video, the smallest
MERGE = 2


def test_position_table_resampling_equals_hf() -> None:
    table = torch.randn(64, 5, generator=torch.Generator().manual_seed(1))
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        GRIDS, num_grid_per_side=8, mode="bilinear", align_corners=True, spatial_merge_size=MERGE
    )
    expected = (table[indices] * weights[:, :, None]).sum(1)
    assert torch.allclose(
        vision_grid.interpolated_position_embeddings(table, GRIDS, MERGE), expected, atol=1e-6
    )


def test_vision_rotary_angles_equal_hf() -> None:
    config = hf_qwen.Qwen3_5VisionConfig(hidden_size=48, num_heads=2, spatial_merge_size=MERGE)
    positions = vision_utils.get_vision_position_ids(GRIDS, MERGE)
    hf_cos, hf_sin = hf_qwen.Qwen3_5VisionRotaryEmbedding(config)(torch.zeros(1), positions)
    angles = vision_grid.rotary_angles(GRIDS, MERGE, head_dim=24, theta=10000).squeeze(1).squeeze(1)
    assert torch.allclose(angles.cos(), hf_cos, atol=1e-6) and torch.allclose(
        angles.sin(), hf_sin, atol=1e-6
    )


def test_each_frame_attends_alone() -> None:
    assert vision_grid.frame_boundaries(GRIDS).tolist() == [0, 24, 48, 72, 76]
    assert torch.equal(
        vision_grid.frame_boundaries(GRIDS), vision_utils.get_vision_cu_seqlens(GRIDS)
    )


def test_block_order_by_hand_and_its_error() -> None:
    # A 2 x 4 frame in 2 x 2 blocks: block (0, 0) holds raster 0, 1, 4, 5; block (0, 1) 2, 3, 6, 7.
    assert vision_grid.block_order(2, 4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    with pytest.raises(ValueError, match="3 x 4 patches does not divide into 2 x 2 blocks"):
        vision_grid.block_order(3, 4, 2)
