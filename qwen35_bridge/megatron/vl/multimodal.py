"""The Megatron-side Qwen3.5 vision-language model: ``vision_model`` + ``language_model``.

The language model is exactly the model a bridge builds for text (GPTModel or HybridModel, with
GDN + gated attention, MoE, MTP); here it receives the token embeddings with each image's (or
video's) merged vision tokens written over its placeholder tokens, and interleaved multimodal
rotary positions.
Parameter names are the bridges' Megatron names (docs/reference.md section 8), so a bridge loads and
exports this model with the code it uses for the language model alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from qwen35_bridge.megatron.vl import mrope
from qwen35_bridge.megatron.vl.vision import VisionModel

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel


@dataclass(frozen=True)
class MultimodalInputs:
    """A batch as Qwen3.5's processor gives it: token ids, each token's type (0 text, 1 image
    placeholder, 2 video placeholder), and the pixel patches and ``(t, h, w)`` patch grids of the
    images and videos in prompt order."""

    input_ids: Tensor
    mm_token_type_ids: Tensor
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_values_videos: Tensor | None = None
    video_grid_thw: Tensor | None = None

    @classmethod
    def from_token_ids(
        cls, input_ids: Tensor, *, image_token_id: int, video_token_id: int, **visual: Tensor | None
    ) -> MultimodalInputs:
        """Token types read off the placeholder ids (the config's ``image_token_id`` and
        ``video_token_id``)."""
        types = (input_ids == image_token_id).long() * mrope.IMAGE + (
            input_ids == video_token_id
        ).long() * mrope.VIDEO
        return cls(input_ids, types, **visual)


class VLModel(MegatronModule):
    """``vision_model`` and ``language_model`` (pipeline parallelism: one stage)."""

    def __init__(self, vision_model: VisionModel, language_model: GPTModel | HybridModel) -> None:
        super().__init__(config=language_model.config)
        self.vision_model = vision_model
        self.language_model = language_model

    def forward(self, inputs: MultimodalInputs) -> Tensor:
        """The language model's output: logits ``[b, s, vocab / tp]`` (MTP runs inside, as in
        GPTModel)."""
        positions = mrope.position_ids(
            inputs.mm_token_type_ids,
            spatial_merge_size=self.vision_model.spatial_merge_size,
            image_grid_thw=inputs.image_grid_thw,
            video_grid_thw=inputs.video_grid_thw,
        ).to(inputs.input_ids.device)
        rotary = self.language_model.rotary_pos_emb
        held = (
            rotary.positions(positions)
            if isinstance(rotary, mrope.PositionedMRoPE)
            else contextlib.nullcontext()
        )
        with held:
            return self.language_model(
                input_ids=inputs.input_ids,
                position_ids=positions,
                attention_mask=None,
                decoder_input=self.embed(inputs),
            )

    def embed(self, inputs: MultimodalInputs) -> Tensor:
        """Token embeddings ``[s, b, h]`` (this rank's part of s under sequence parallelism) with
        the vision tokens of the images and of the videos over their placeholders, in order."""
        text = self.language_model.embedding(input_ids=inputs.input_ids, position_ids=None)
        visual = torch.zeros(
            *inputs.input_ids.shape, text.shape[-1], dtype=text.dtype, device=text.device
        )
        for name, kind, pixels, grid in (
            ("image", mrope.IMAGE, inputs.pixel_values, inputs.image_grid_thw),
            ("video", mrope.VIDEO, inputs.pixel_values_videos, inputs.video_grid_thw),
        ):
            where = inputs.mm_token_type_ids == kind
            if pixels is None or grid is None:
                if where.any():
                    raise ValueError(
                        f"{int(where.sum())} {name} placeholders but no {name} pixels and grid"
                    )
                continue
            tokens = self.vision_model(pixels, grid).tokens
            if tokens.shape[0] != int(where.sum()):
                raise ValueError(
                    f"the {name}s give {tokens.shape[0]} vision tokens for {int(where.sum())} {name} placeholders"
                )
            visual[where] = tokens.to(text.dtype)
        placeholders = (inputs.mm_token_type_ids != mrope.TEXT).unsqueeze(-1)
        visual, placeholders = visual.transpose(0, 1), placeholders.transpose(0, 1)  # [s, b, ...]
        if self.config.sequence_parallel:
            visual = tensor_parallel.scatter_to_sequence_parallel_region(visual)
            placeholders = tensor_parallel.scatter_to_sequence_parallel_region(placeholders)
        return torch.where(placeholders, visual, text)


def vision_settings(language_config: TransformerConfig) -> dict[str, Any]:
    """``TransformerConfig`` values of the vision tower that follow the language model: tensor
    parallelism (no sequence parallelism: frames are packed) and dtypes, plus the CPU backend's
    settings without Transformer Engine."""
    from qwen35_bridge.megatron.gpt import cpu_config_overrides
    from qwen35_bridge.megatron.shims import transformer_engine_available

    for name in ("pipeline_model_parallel_size", "context_parallel_size"):
        if getattr(language_config, name) > 1:
            raise NotImplementedError(
                f"the VL model runs with {name}=1; got {getattr(language_config, name)}"
            )
    settings = {} if transformer_engine_available() else cpu_config_overrides()
    return settings | {
        "tensor_model_parallel_size": language_config.tensor_model_parallel_size,
        "params_dtype": language_config.params_dtype,
        "pipeline_dtype": language_config.params_dtype,
        "bf16": language_config.bf16,
    }


def assemble(
    language_model: GPTModel | HybridModel,
    vision_config: TransformerConfig,
    vision_model_args: dict[str, Any],
    *,
    mrope_section: Sequence[int],
    rotary_percent: float,
    rotary_base: float,
) -> VLModel:
    """The VL model around a bridge's language model, switched to interleaved mRoPE.

    GPTModel decides at forward time how it calls ``rotary_pos_emb``: in ``mrope`` mode with the
    ``[3, b, s]`` position ids and ``mrope_section``. Its own module for that mode has contiguous
    sections, so the interleaved one takes its place; the embedding and the MTP block are
    unaffected (neither uses the mode). HybridModel has only plain RoPE's call (a sequence
    length), so it gets the interleaved module behind that call (``PositionedMRoPE``), fed with the
    positions by ``VLModel.forward``.
    """
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    rotary = mrope.InterleavedMRoPE(
        kv_channels=language_model.config.kv_channels,
        rotary_percent=rotary_percent,
        rotary_base=rotary_base,
    )
    if isinstance(language_model, HybridModel):
        language_model.rotary_pos_emb = mrope.PositionedMRoPE(rotary, mrope_section)
    else:
        language_model.position_embedding_type = "mrope"
        language_model.mrope_section = list(mrope_section)
        language_model.rotary_pos_emb = rotary
    return VLModel(VisionModel(vision_config, **vision_model_args), language_model)


@torch.no_grad()
def vl_forward_logits(model: VLModel, inputs: MultimodalInputs) -> tuple[Tensor, list[Tensor]]:
    """Full-vocabulary logits ``[b, s, V]`` of the main head and of each MTP layer, in eval mode,
    gathered over TP on every rank. The output layer runs once per MTP layer, then for the main
    head (megatron-core 0.19.2); each call's output is cloned in the hook."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    captured: list[Tensor] = []
    handle = model.language_model.output_layer.register_forward_hook(
        lambda _m, _i, output: captured.append(output[0].clone())
    )
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        handle.remove()
        model.train(was_training)
    expected = 1 + (model.config.mtp_num_layers or 0)
    if len(captured) != expected:
        raise RuntimeError(f"expected {expected} output-layer calls, saw {len(captured)}")
    heads = [
        gather_from_tensor_model_parallel_region(t).transpose(0, 1).contiguous() for t in captured
    ]
    return heads[-1], heads[:-1]
