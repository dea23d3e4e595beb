"""Megatron-Bridge's run tree: Megatron-LM's, plus its own record of the run.

An iteration folder (`iter_0000100/`) holds, beside the torch_dist files, `run_config.yaml` (the
whole training configuration; its `model` section is the model provider with its fields), and
`train_state.pt` (step and sample counters, as 0-d tensors); the run root holds a copy of the
newest train state, `latest_train_state.pt`, which Megatron-Bridge's loaders read before the
tracker, and the iteration folder may hold the tokenizer's files under `tokenizer/`
(docs/reference.md section 11). The model section is written from, and checked against, the same
architecture the torch_dist layout was derived from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qwen35_bridge.errors import ConversionError

RUN_CONFIG_NAME = "run_config.yaml"
TRAIN_STATE_NAME = "train_state.pt"
LATEST_TRAIN_STATE_NAME = "latest_train_state.pt"
TOKENIZER_FOLDER = "tokenizer"

#: The model providers Megatron-Bridge builds Qwen3.5 models with: text-only models with its
#: generic GPT provider, vision-language ones with its Qwen3.5-VL providers.
GPT_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
VL_PROVIDERS = {
    False: "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLModelProvider",
    True: "megatron.bridge.models.qwen_vl.qwen35_vl_provider.Qwen35VLMoEModelProvider",
}
#: Megatron-Bridge's way of naming a function in YAML: its dotted path, not called.
SILU = {"_target_": "torch.nn.functional.silu", "_call_": False}
LAYER_SPEC = {
    "_target_": "megatron.core.models.gpt.experimental_attention_variant_module_specs."
    "get_transformer_block_with_experimental_attention_variant_spec",
    "_call_": False,
}
#: Fields of the model section that are the GPT model's, not megatron-core's TransformerConfig's.
_GPT_FIELDS = {
    "vocab_size": "vocab_size",
    "seq_length": "max_sequence_length",
    "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent",
    "share_embeddings_and_output_weights": "share_embeddings_and_output_weights",
}


def model_section(
    architecture: dict[str, Any],
    gpt_model_args: dict[str, Any],
    *,
    model_id: str,
    vision_language: bool,
) -> dict[str, Any]:
    """The `model` section of run_config.yaml: the provider and the model's fields."""
    target = (
        VL_PROVIDERS[bool(architecture["num_moe_experts"])] if vision_language else GPT_PROVIDER
    )
    section: dict[str, Any] = {"_target_": target}
    section |= {k: v for k, v in architecture.items() if v is not None}
    section |= {field: gpt_model_args[arg] for field, arg in _GPT_FIELDS.items()}
    section |= {
        "activation_func": SILU,
        "position_embedding_type": "mrope" if vision_language else "rope",
        "transformer_layer_spec": LAYER_SPEC,
        "hetereogenous_dist_checkpoint": True,  # (sic) megatron-core's spelling: per-layer keys
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "hf_model_id": model_id,
    }
    return section


def write_run_config(folder: Path, section: dict[str, Any]) -> None:
    """run_config.yaml with the model section, and a checkpoint section saying that no optimizer
    or RNG state was saved (Megatron-Bridge reads both when it resumes)."""
    import yaml

    config = {"model": section, "checkpoint": {"save_optim": False, "save_rng": False}}
    (Path(folder) / RUN_CONFIG_NAME).write_text(
        yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
    )


def write_train_state(path: Path, step: int) -> None:
    """A train state at `step` with nothing consumed, as Megatron-Bridge saves one."""
    state = {
        "step": torch.tensor(step, dtype=torch.int64),
        "consumed_train_samples": torch.tensor(0, dtype=torch.int64),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
        "floating_point_operations_so_far": torch.tensor(0, dtype=torch.float32),
        "do_train": torch.tensor(False),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }
    torch.save(state, path)


def read_train_state_step(path: Path) -> int:
    """The step a train state file records (tensors only: read with weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return int(state["step"])
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or malformed file
        raise ConversionError(f"{path}: not a Megatron-Bridge train state ({e})") from None


def read_model_section(folder: Path) -> dict[str, Any] | None:
    """The `model` section of an iteration folder's run_config.yaml, or None without one."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid YAML ({e})") from None
    section = config.get("model") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise ConversionError(f"{path}: no model section")
    return section


def check_model_section(
    section: dict[str, Any],
    architecture: dict[str, Any],
    gpt_model_args: dict[str, Any],
    path: Path,
) -> None:
    """Every field the run's model section shares with the bridge's model must agree with it; a
    disagreement names the field and both values (the checkpoint is another model)."""
    expected = {k: v for k, v in architecture.items()}
    expected |= {field: gpt_model_args[arg] for field, arg in _GPT_FIELDS.items()}
    for field, value in expected.items():
        if field not in section or (value is None and section[field] is None):
            continue
        found = section[field]
        if json.dumps(_plain(found)) != json.dumps(_plain(value)):
            raise ConversionError(
                f"{Path(path) / RUN_CONFIG_NAME}: model.{field} is {found!r}, but the bridge's "
                f"model has {value!r}; the checkpoint is not of this model"
            )


def _plain(value: Any) -> Any:
    """Numbers compared by value (1 and 1.0 alike, as YAML may write either)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
