"""Write tiny HF checkpoints in the real on-disk layout, and read them back.

A bridge is only proven if it reads what is published: the VL prefixes (`model.language_model.*`,
`model.visual.*`, top-level `lm_head.weight` and `mtp.*`), either text-only Qwen3.5 prefix
(`model.layers.N.*` or `model.language_model.layers.N.*`), Qwen3-Next's `model.*`, routed experts
packed or per expert, sharded safetensors with an exact `model.safetensors.index.json`, no
`lm_head.weight` when tied. `save_pretrained` cannot write MTP tensors and picks the expert layout
itself, so the files are written here, and the exact tensors written are returned for byte-for-byte
round-trip checks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from qwen35_bridge.families import config_form, text_model_type
from qwen35_bridge.reference.expert_layouts import (
    ExpertsLayout,
    check_layout,
    pack_experts,
    replace_prefix,
    to_layout,
)
from qwen35_bridge.reference.mtp import MTP_PREFIX
from tests.support.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from tests.support.models import build_hf_model
from tests.support.mtp import mtp_tensors
from tests.support.tiny import (
    is_moe,
    text_only_config,
    tied_embeddings,
    tiny_config,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TEXT_PREFIXES = ("model", "model.language_model")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def shard_name(index: int, total: int) -> str:
    """HF shard file name, 1-based: `model-00001-of-00002.safetensors`."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def checkpoint_state(
    config: dict[str, Any],
    model: transformers.PreTrainedModel,
    mtp: dict[str, torch.Tensor],
    *,
    experts_layout: ExpertsLayout | None,
    text_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """The HF tensors as they are named and laid out on disk (contiguous CPU copies).

    `text_prefix` applies to text-only Qwen3.5 (`"model"`, the default, or
    `"model.language_model"`); VL and Qwen3-Next have one fixed layout. Decoder experts go to
    `experts_layout` (required for MoE, may be None for dense); `mtp` is written as given (its
    layout is its own, docs/reference.md section 7).
    """
    if is_moe(config) or experts_layout is not None:
        check_layout(experts_layout)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if tied_embeddings(config):
        state.pop("lm_head.weight", None)
    state = replace_prefix(state, "model", _text_prefix(config, text_prefix))
    if is_moe(config):
        state = to_layout(state, experts_layout)
    duplicate = sorted(set(state) & set(mtp))
    if duplicate or any(not k.startswith(MTP_PREFIX) for k in mtp):
        raise ValueError(f"mtp tensors must all be new `mtp.*` names: {duplicate[:3]}")
    state.update(mtp)
    return {k: v.to("cpu").contiguous().clone() for k, v in state.items()}


def load_into_model(
    model: transformers.PreTrainedModel,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    text_prefix: str | None = None,
) -> None:
    """Inverse of `checkpoint_state` for the model part: copy on-disk tensors (either experts
    layout, `mtp.*` ignored) into `model`; every model tensor must be covered."""
    inner = {k: v for k, v in state.items() if not k.startswith(MTP_PREFIX)}
    inner = pack_experts(replace_prefix(inner, _text_prefix(config, text_prefix), "model"))
    result = model.load_state_dict(inner, strict=False)
    allowed = {"lm_head.weight"} if tied_embeddings(config) else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise ValueError(
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _text_prefix(config: dict[str, Any], text_prefix: str | None) -> str:
    """Validated prefix of the decoder keys in a text-only checkpoint ("model" when not text-only)."""
    text_only_qwen35 = not config_form(config).vision and text_model_type(config) != "qwen3_next"
    if text_prefix is None:
        return "model"
    if text_prefix not in TEXT_PREFIXES or (text_prefix != "model" and not text_only_qwen35):
        raise ValueError(
            f"text_prefix={text_prefix!r} applies only to text-only Qwen3.5: one of {TEXT_PREFIXES}"
        )
    return text_prefix


def write_state(
    dest: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
    *,
    shards: int = 2,
    mtp_in_separate_shard: bool = False,
) -> dict[str, torch.Tensor]:
    """Write `config.json` and `state` as safetensors: one `model.safetensors` when `shards == 1`
    (as transformers does), else `shards` files plus the index. With `mtp_in_separate_shard`,
    the last shard holds exactly the `mtp.*` tensors. Returns `state`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    groups = _shard_groups(state, shards, mtp_in_separate_shard)
    if len(groups) == 1:
        save_file(state, str(dest / SINGLE_FILE), metadata={"format": "pt"})
        return state
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(groups, start=1):
        name = shard_name(i, len(groups))
        save_file({k: state[k] for k in keys}, str(dest / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {
        "metadata": {"total_size": total_size(state)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return state


def total_size(state: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data, the index's `metadata.total_size`."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _shard_groups(state: dict[str, torch.Tensor], shards: int, mtp_alone: bool) -> list[list[str]]:
    """Split the keys, in order, into `shards` contiguous groups of similar byte size."""
    if shards < 1 or (mtp_alone and shards < 2):
        raise ValueError(f"shards={shards} (mtp_in_separate_shard={mtp_alone})")
    mtp_keys = [k for k in state if k.startswith(MTP_PREFIX)] if mtp_alone else []
    if mtp_alone and not mtp_keys:
        raise ValueError("mtp_in_separate_shard=True but there are no mtp.* tensors")
    rest = [k for k in state if k not in set(mtp_keys)]
    groups = _balanced(rest, state, shards - (1 if mtp_alone else 0))
    return groups + ([mtp_keys] if mtp_alone else [])


def _balanced(keys: list[str], state: dict[str, torch.Tensor], n: int) -> list[list[str]]:
    if n > len(keys):
        raise ValueError(f"{n} shards for {len(keys)} tensors")
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    target = sum(sizes) / n
    groups: list[list[str]] = [[]]
    acc = 0
    for i, (key, size) in enumerate(zip(keys, sizes)):
        left_keys, left_groups = len(keys) - i, n - len(groups)
        if (
            groups[-1]
            and len(groups) < n
            and (acc >= target * len(groups) or left_keys == left_groups)
        ):
            groups.append([])
        groups[-1].append(key)
        acc += size
    return groups


def write_checkpoint(
    dest: Path,
    config: dict[str, Any],
    model: transformers.PreTrainedModel,
    mtp: dict[str, torch.Tensor],
    *,
    experts_layout: ExpertsLayout | None,
    text_prefix: str | None = None,
    shards: int = 2,
    mtp_in_separate_shard: bool = False,
) -> dict[str, torch.Tensor]:
    """Write `model` + `mtp` under `dest` in the real layout; return exactly the tensors written.

    `config.json` is `config` with its dtype fields set to the tensors' dtype (a float32 test
    checkpoint must not claim bfloat16, or `from_pretrained(dtype="auto")` would cast it). When
    `config` has a `quantization_config`, the linear weights are written FP8 block-quantised.
    """
    state = checkpoint_state(
        config, model, mtp, experts_layout=experts_layout, text_prefix=text_prefix
    )
    dtype = next(iter(model.parameters())).dtype
    if config.get("quantization_config"):
        quant = config["quantization_config"]
        state = quantize_fp8_blockwise(
            state,
            block=quant["weight_block_size"][0],
            modules_to_not_convert=quant.get("modules_to_not_convert", []),
        )
    return write_state(
        dest,
        with_dtype(config, dtype),
        state,
        shards=shards,
        mtp_in_separate_shard=mtp_in_separate_shard,
    )


def with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A copy of `config` whose existing `dtype`/`torch_dtype` fields (top level and
    `text_config`) name `dtype`."""
    out = copy.deepcopy(config)
    for d in (out, out.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = DTYPE_NAMES[dtype]
    return out


def read_index(path: Path) -> dict[str, Any]:
    """The parsed `model.safetensors.index.json` of a checkpoint directory."""
    return json.loads((Path(path) / INDEX_NAME).read_text())


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded with index, or a single file)."""
    path = Path(path)
    files = (
        sorted(set(read_index(path)["weight_map"].values()))
        if (path / INDEX_NAME).exists()
        else [SINGLE_FILE]
    )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


@dataclass(frozen=True)
class TinyCheckpoint:
    """A written test checkpoint: where, its config (as written), the tensors written, the HF
    model, and the MTP tensors before any FP8 quantisation (for `reference_mtp_logits`)."""

    path: Path
    config: dict[str, Any]
    state: dict[str, torch.Tensor]
    model: transformers.PreTrainedModel
    mtp: dict[str, torch.Tensor]


def make_checkpoint(
    dest: Path,
    source_config: dict[str, Any],
    *,
    seed: int = 0,
    experts_layout: ExpertsLayout = "packed",
    mtp_experts_layout: ExpertsLayout | None = None,
    text_only: bool = False,
    text_prefix: str | None = None,
    tie: bool | None = None,
    shards: int = 2,
    mtp_in_separate_shard: bool = False,
    dtype: torch.dtype = torch.float32,
    tiny: bool = True,
    **tiny_kwargs: Any,
) -> TinyCheckpoint:
    """Tiny config -> random HF model -> random MTP -> files, in one call.

    `source_config` is a raw catalog config (shrunk by `tiny_config` unless `tiny=False`, then it
    is used as is). `text_only` turns a VL config into its flat text-only form first. MTP experts
    default to the decoder's layout. The MTP seed is derived from `seed`, so one seed fixes all.
    With a `quantization_config` (FP8), the model and MTP tensors returned are set to the
    dequantised values of the file, so they are exactly what the checkpoint represents.
    """
    config = (
        tiny_config(source_config, tie=tie, **tiny_kwargs) if tiny else copy.deepcopy(source_config)
    )
    if text_only:
        config = text_only_config(config)
    model = build_hf_model(config, seed=seed, dtype=dtype)
    mtp_layout = (mtp_experts_layout or experts_layout) if is_moe(config) else None
    mtp = {
        k: v.to(dtype)
        for k, v in mtp_tensors(config, seed=seed + 1_000_003, experts_layout=mtp_layout).items()
    }
    state = write_checkpoint(
        dest,
        config,
        model,
        mtp,
        experts_layout=experts_layout,
        text_prefix=text_prefix,
        shards=shards,
        mtp_in_separate_shard=mtp_in_separate_shard,
    )
    if config.get("quantization_config"):
        real = dequantize_fp8_blockwise(
            state, block=config["quantization_config"]["weight_block_size"][0], dtype=dtype
        )
        load_into_model(model, config, real, text_prefix=text_prefix)
        mtp = {k: real[k] for k in mtp}
    return TinyCheckpoint(Path(dest), with_dtype(config, dtype), state, model, mtp)
