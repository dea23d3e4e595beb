"""transformers config objects and model classes for raw Qwen3.5-family config dicts.

`verify` builds its HF reference from these, and the test factory builds its random models from
them, so both resolve a config to the same class through the one family table.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import transformers
from torch import nn

from qwen35_bridge.families import config_form, text_config_of


def hf_config(config: Mapping[str, Any]) -> transformers.PreTrainedConfig:
    """The transformers config object for a raw config dict (quantisation left out: the HF model
    is the unquantised reference; FP8 is a property of the stored tensors)."""
    raw = copy.deepcopy(dict(config))
    raw.pop("quantization_config", None)
    cls = transformers.CONFIG_MAPPING[raw["model_type"]]
    return cls.from_dict(raw)


def text_hf_config(config: Mapping[str, Any]) -> transformers.PreTrainedConfig:
    """The language model's config object (a VL config's `text_config`, with its model_type)."""
    text = copy.deepcopy(dict(text_config_of(config)))
    form = config_form(config)
    if form.vision:
        text.setdefault("model_type", form.family.text_model_type)
    return hf_config(text)


def hf_model_class(config: Mapping[str, Any]) -> type[transformers.PreTrainedModel]:
    """The HF class: `architectures[0]` when given, else the text-only CausalLM of the model_type."""
    archs = config.get("architectures")
    if archs:
        return getattr(transformers, archs[0])
    form = config_form(config)
    if form.vision:
        raise ValueError("a VL config needs `architectures` to choose its class")
    return getattr(transformers, form.architecture)


def language_model(model: transformers.PreTrainedModel) -> nn.Module:
    """The text decoder (embed_tokens, layers, norm, rotary_emb) of a VL or text-only HF model."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner
