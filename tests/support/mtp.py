"""Random HF `mtp.*` tensors, made with the same module `verify` uses as its MTP reference."""

from __future__ import annotations

from typing import Any

import torch

from qwen35_bridge.reference.expert_layouts import ExpertsLayout, to_layout
from qwen35_bridge.reference.hf_models import text_hf_config
from qwen35_bridge.reference.mtp import MTP_PREFIX, ReferenceMTP
from tests.support.models import randomize_
from tests.support.tiny import moe_layers


def mtp_tensors(
    config: dict[str, Any], *, seed: int, experts_layout: ExpertsLayout | None
) -> dict[str, torch.Tensor]:
    """Random HF `mtp.*` tensors for `config` (raw dict), deterministic from `seed`.

    The MTP layer is a full-attention layer with the MLP kind of the last decoder layer (the
    layer Megatron builds it from). Routed experts come in `experts_layout`; it must be given for
    MoE models (published Qwen3.5 MTP experts are per expert, Qwen3.6 packed) and is ignored for
    dense ones.
    """
    moe = moe_layers(config)[-1]
    if moe and experts_layout is None:
        raise ValueError("MoE MTP layer: experts_layout must be 'packed' or 'per_expert'")
    module = ReferenceMTP(text_hf_config(config), moe=moe)
    randomize_(module, seed=seed)
    state = {MTP_PREFIX + k: v.detach().clone() for k, v in module.state_dict().items()}
    return to_layout(state, experts_layout) if moe else state
