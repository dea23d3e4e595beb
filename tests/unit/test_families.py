"""The family table (`qwen35_bridge.families`) against transformers, and the pins that must agree."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest
import transformers

from qwen35_bridge import versions
from qwen35_bridge.families import CONFIG_FORMS, FAMILIES, config_form, text_model_type

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_names_real_transformers_classes(name: str) -> None:
    family = FAMILIES[name]
    modeling = importlib.import_module(family.modeling_module)
    for suffix in ("DecoderLayer", "RMSNorm"):
        assert hasattr(modeling, family.class_prefix + suffix)
    assert transformers.CONFIG_MAPPING[family.text_model_type].model_type == family.text_model_type
    assert hasattr(transformers, family.causal_lm_class)
    if family.vl_model_type is not None:
        assert transformers.CONFIG_MAPPING[family.vl_model_type].model_type == family.vl_model_type
        assert hasattr(transformers, family.vl_class)


def test_config_forms_resolve_vl_and_flat_configs() -> None:
    vl = {"model_type": "qwen3_5_moe", "text_config": {}}
    assert config_form(vl).vision and config_form(vl).architecture.endswith(
        "ForConditionalGeneration"
    )
    assert text_model_type(vl) == "qwen3_5_moe_text"
    flat = {"model_type": "qwen3_next"}
    assert not config_form(flat).vision and config_form(flat).architecture == "Qwen3NextForCausalLM"
    with pytest.raises(ValueError, match="llama"):
        config_form({"model_type": "llama"})
    with pytest.raises(ValueError, match="qwen3_5"):
        config_form({"model_type": "qwen3_5"})  # a VL model_type without its text_config
    assert len(CONFIG_FORMS) == 5


def test_the_megatron_core_pin_is_the_one_the_runtime_requires() -> None:
    """pyproject's pin and `versions.MEGATRON_CORE_VERSION` are one fact written twice (pip needs
    it in pyproject); they must not drift apart."""
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in dependencies if (m := re.fullmatch(r"megatron-core==(\S+)", d))]
    assert pins == [versions.MEGATRON_CORE_VERSION]
    assert versions.MEGATRON_CORE_SERIES == ".".join(versions.MEGATRON_CORE_VERSION.split(".")[:2])
