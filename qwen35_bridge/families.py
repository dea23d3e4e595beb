"""The model families this project covers, defined once: config `model_type`s, HF classes and the
transformers modules that implement them. Spec inference, the HF reference forwards and the test
factory all read this table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """One family of language models and the HF classes that hold it."""

    name: str  # qwen3_5 (dense), qwen3_5_moe, qwen3_next
    text_model_type: str  # model_type of the flat text config
    causal_lm_class: str  # the text-only HF class
    vl_model_type: str | None  # model_type of the vision-language config, if there is one
    vl_class: str | None  # the vision-language HF class
    modeling_module: str  # transformers module with the decoder layer, norm and GDN classes
    class_prefix: str  # prefix of that module's class names (`Qwen3_5MoeDecoderLayer`)
    # How the family's published checkpoints store routed experts (docs/reference.md section 6);
    # None for a dense family.
    published_experts_layout: str | None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "qwen3_5",
            "qwen3_5_text",
            "Qwen3_5ForCausalLM",
            "qwen3_5",
            "Qwen3_5ForConditionalGeneration",
            "transformers.models.qwen3_5.modeling_qwen3_5",
            "Qwen3_5",
            None,
        ),
        Family(
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "Qwen3_5MoeForCausalLM",
            "qwen3_5_moe",
            "Qwen3_5MoeForConditionalGeneration",
            "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
            "Qwen3_5Moe",
            "packed",
        ),
        Family(
            "qwen3_next",
            "qwen3_next",
            "Qwen3NextForCausalLM",
            None,
            None,
            "transformers.models.qwen3_next.modeling_qwen3_next",
            "Qwen3Next",
            "per_expert",
        ),
    )
}


@dataclass(frozen=True)
class ConfigForm:
    """What a config's top-level `model_type` says: the family, and whether the config is the
    vision-language form (language fields under `text_config`) or a flat text config."""

    model_type: str
    family: Family
    vision: bool

    @property
    def architecture(self) -> str:
        """The HF class `architectures` names for this form."""
        cls = self.family.vl_class if self.vision else self.family.causal_lm_class
        assert cls is not None
        return cls


CONFIG_FORMS: dict[str, ConfigForm] = {
    **{f.text_model_type: ConfigForm(f.text_model_type, f, False) for f in FAMILIES.values()},
    **{
        f.vl_model_type: ConfigForm(f.vl_model_type, f, True)
        for f in FAMILIES.values()
        if f.vl_model_type
    },
}

#: `vision_config.model_type` values of the Qwen3.5 vision tower (re-serialised configs rename it).
VISION_MODEL_TYPES = frozenset({"qwen3_5", "qwen3_5_vision", "qwen3_5_moe", "qwen3_5_moe_vision"})


def family_of_text_model_type(model_type: str) -> Family:
    """The family whose flat text config has this `model_type` (KeyError otherwise)."""
    return CONFIG_FORMS[model_type].family


def config_form(config: Mapping[str, Any]) -> ConfigForm:
    """The form of a raw config dict; ValueError naming the expected model_types otherwise."""
    model_type = config.get("model_type")
    form = CONFIG_FORMS.get(model_type) if isinstance(model_type, str) else None
    if form is None or (form.vision and "text_config" not in config):
        raise ValueError(
            f"model_type={model_type!r}: expected one of {sorted(CONFIG_FORMS)} "
            "(a vision-language model_type with its text_config)"
        )
    return form


def text_config_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model fields: `text_config` for the VL form, the config itself when flat."""
    return config["text_config"] if config_form(config).vision else config


def text_model_type(config: Mapping[str, Any]) -> str:
    """model_type of the language model (`qwen3_5_text`, `qwen3_5_moe_text` or `qwen3_next`)."""
    form = config_form(config)
    if form.vision:
        return config["text_config"].get("model_type", form.family.text_model_type)
    return form.model_type
