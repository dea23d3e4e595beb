"""Vision-language test inputs and expected outputs: a synthetic prompt holding images, the HF
model's logits on it, and the MTP logits a reference built from HF modules gives.

The prompt is laid out as Qwen3.5's chat template lays out images (text, ``<vision_start>``, one
placeholder per merged vision token, ``<vision_end>``, text), with random pixels and random text
tokens that avoid every vision token id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers

from qwen35_bridge.megatron.vl.multimodal import MultimodalInputs
from qwen35_bridge.reference.hf_kernels import use_torch_gdn_kernels
from qwen35_bridge.reference.mtp import language_model, load_reference_mtp

VISION_TOKEN_KEYS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


def synthetic_prompt(
    config: dict[str, Any], grids: Sequence[tuple[int, int, int]], *, text_tokens: int, seed: int
) -> MultimodalInputs:
    """One prompt (batch 1) for a VL `config.json` dict: `text_tokens` random text tokens split
    evenly around the images, one image per `(t, h, w)` patch grid, random pixels."""
    vision = config["vision_config"]
    merge = vision["spatial_merge_size"]
    gen = torch.Generator().manual_seed(seed)
    text_high = min(config[k] for k in VISION_TOKEN_KEYS)
    cuts = [text_tokens * i // (len(grids) + 1) for i in range(len(grids) + 2)]
    ids: list[int] = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        ids += torch.randint(0, text_high, (end - start,), generator=gen).tolist()
        if i < len(grids):
            t, h, w = grids[i]
            if h % merge or w % merge:
                raise ValueError(
                    f"grid {grids[i]}: h and w must be multiples of spatial_merge_size {merge}"
                )
            placeholders = [config["image_token_id"]] * (t * h * w // merge**2)
            ids += [config["vision_start_token_id"], *placeholders, config["vision_end_token_id"]]
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    patches = sum(t * h * w for t, h, w in grids)
    return MultimodalInputs.from_token_ids(
        torch.tensor([ids]),
        image_token_id=config["image_token_id"],
        video_token_id=config["video_token_id"],
        pixel_values=torch.randn(patches, patch_dim, generator=gen),
        image_grid_thw=torch.tensor(grids),
    )


def hf_visual_inputs(inputs: MultimodalInputs) -> dict[str, torch.Tensor]:
    """The keyword arguments of HF's `Qwen3_5(Moe)ForConditionalGeneration.forward` for `inputs`."""
    names = (
        "input_ids",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
    )
    return {name: getattr(inputs, name) for name in names if getattr(inputs, name) is not None}


@torch.no_grad()
def hf_vl_logits(model: transformers.PreTrainedModel, inputs: MultimodalInputs) -> torch.Tensor:
    """The HF VL model's logits `[B, S, V]` on `inputs`."""
    use_torch_gdn_kernels()
    return model.eval()(**hf_visual_inputs(inputs)).logits


@torch.no_grad()
def reference_vl_mtp_logits(
    model: transformers.PreTrainedModel, mtp: dict[str, torch.Tensor], inputs: MultimodalInputs
) -> torch.Tensor:
    """One MTP layer's logits `[B, S, V]` on top of the HF VL model.

    The MTP layer works as megatron-core's does: it embeds the next token's id with the word
    embedding (an image placeholder gives the placeholder's embedding, not the vision token) and
    takes the main model's multimodal rotary positions; ids shift left with a zero fill (see
    `qwen35_bridge.reference.mtp.reference_mtp_logits` for the text-only form).
    """
    use_torch_gdn_kernels()
    hidden = model.eval().model(**hf_visual_inputs(inputs)).last_hidden_state
    positions, _ = model.model.get_rope_index(
        inputs.input_ids,
        inputs.mm_token_type_ids,
        image_grid_thw=inputs.image_grid_thw,
        video_grid_thw=inputs.video_grid_thw,
    )
    lm = language_model(model)
    shifted = torch.cat([inputs.input_ids[:, 1:], torch.zeros_like(inputs.input_ids[:, :1])], dim=1)
    text_positions = torch.arange(inputs.input_ids.shape[1]).expand_as(inputs.input_ids)
    out = load_reference_mtp(model, mtp)(
        hidden, lm.embed_tokens(shifted), lm.rotary_emb(hidden, positions), text_positions
    )
    return model.get_output_embeddings()(out)
