"""Infer a ModelSpec from a raw config.json (and the checkpoint's weight map when there is one).

The rules are docs/reference.md section 1; the families are `qwen35_bridge.families`. Every architectural value comes from the config itself, never
from a transformers default; anything unknown, unsupported or contradictory is a ConfigError
naming the field, the value and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen35_bridge.families import CONFIG_FORMS, VISION_MODEL_TYPES, ConfigForm
from qwen35_codegen.errors import MISSING, ConfigError
from qwen35_codegen.spec import keys
from qwen35_codegen.spec.model_spec import (
    EXPERTS_LAYOUTS,
    AttentionSpec,
    GDNSpec,
    ModelSpec,
    MoESpec,
    QuantizationSpec,
    VisionSpec,
)

REJECTED_MODEL_TYPES = {
    "qwen4_exp": "a different architecture (several residual streams, n-gram embeddings), not supported",
}


@dataclass(frozen=True)
class Statement:
    """A layout stated by a catalog entry, with where that statement comes from."""

    value: str
    provenance: str


@dataclass(frozen=True)
class LayoutChoices:
    """What the user chose on the command line, for what neither index nor catalog decides."""

    experts: str | None = None
    mtp_experts: str | None = None
    hf_prefix: str | None = None


@dataclass
class _Context:
    """The config being read, and the notes gathered on the way."""

    config: Mapping[str, Any]
    path: str
    notes: list[str] = field(default_factory=list)

    def name(self, key: str) -> str:
        return f"{self.path}{key}"

    def get(self, key: str, default: Any = MISSING) -> Any:
        return self.config.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.config:
            raise ConfigError(
                self.name(key), MISSING, "a value in the config (no library default is assumed)"
            )
        return self.config[key]

    def positive_int(self, key: str) -> int:
        value = self.require(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(self.name(key), value, "a positive integer")
        return value

    def positive_float(self, key: str, value: Any = MISSING) -> float:
        value = self.require(key) if value is MISSING else value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(self.name(key), value, "a positive number")
        return float(value)

    def check_value(self, key: str, supported: Any) -> None:
        if key in self.config and self.config[key] != supported:
            raise ConfigError(
                self.name(key), self.config[key], f"{supported!r} (the only supported value)"
            )


def infer_spec(
    config: Mapping[str, Any],
    *,
    weight_map: Mapping[str, str] | None = None,
    statements: Mapping[str, Statement] | None = None,
    choices: LayoutChoices = LayoutChoices(),
) -> ModelSpec:
    """The spec of `config`; `weight_map` is the `weight_map` of model.safetensors.index.json."""
    if not isinstance(config, Mapping):
        raise ConfigError("<root>", type(config).__name__, "a JSON object")
    statements = statements or {}
    top = _Context(config, "")
    form = _config_form(top)
    text = _Context(_text_config(top, form), "text_config." if form.vision else "")
    _check_keys(top, text, form)

    hidden = text.positive_int("hidden_size")
    num_layers = text.positive_int("num_hidden_layers")
    layer_types = _layer_types(text, num_layers)
    attention = _attention(text, form)
    gdn = _gdn(text, form)
    moe = _moe(text, form)
    mlp_types = _mlp_types(text, form, num_layers)
    mtp_layers = _mtp_layers(text, form, weight_map)
    mtp_mlp_type = ("moe" if moe else "dense") if mtp_layers else None
    if mtp_layers:
        _check_mtp_matches_last_layer(text, layer_types, mlp_types, mtp_mlp_type)
    needs_dense = "dense" in mlp_types or mtp_mlp_type == "dense"
    dense_size = text.positive_int("intermediate_size") if needs_dense else None
    vision = _vision(top, hidden) if form.vision else None
    tie = _tie(top, text, form, weight_map)
    hf_prefix = _hf_prefix(text, form, weight_map, choices)
    quantization = _quantization(top, text, form, weight_map)

    experts_layout = mtp_experts_layout = None
    if moe:
        experts_layout = _experts_layout(
            text,
            "experts_layout",
            _decoder_layout_in_index(weight_map, hf_prefix, mlp_types),
            statements.get("experts_layout"),
            choices.experts,
            form.family.published_experts_layout,
        )
        if mtp_layers:
            mtp_experts_layout = _experts_layout(
                text,
                "mtp_experts_layout",
                _mtp_layout_in_index(weight_map),
                statements.get("mtp_experts_layout"),
                choices.mtp_experts,
                None,
            )

    return ModelSpec(
        family=form.family.name,  # type: ignore[arg-type]
        architecture=form.architecture,
        hf_prefix=hf_prefix,
        vision=vision,
        vocab_size=text.positive_int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        rms_norm_eps=text.positive_float("rms_norm_eps"),
        max_position_embeddings=text.positive_int("max_position_embeddings"),
        layer_types=layer_types,
        mlp_types=mlp_types,
        dense_intermediate_size=dense_size,
        attention=attention,
        gdn=gdn,
        moe=moe,
        experts_layout=experts_layout,  # type: ignore[arg-type]
        mtp_layers=mtp_layers,
        mtp_mlp_type=mtp_mlp_type,  # type: ignore[arg-type]
        mtp_experts_layout=mtp_experts_layout,  # type: ignore[arg-type]
        tie_word_embeddings=tie,
        quantization=quantization,
        notes=tuple(top.notes + text.notes),
    )


def _config_form(top: _Context) -> ConfigForm:
    model_type = top.require("model_type")
    if model_type in REJECTED_MODEL_TYPES:
        raise ConfigError("model_type", model_type, REJECTED_MODEL_TYPES[model_type])
    if model_type not in CONFIG_FORMS:
        raise ConfigError("model_type", model_type, f"one of {', '.join(sorted(CONFIG_FORMS))}")
    form = CONFIG_FORMS[model_type]
    architectures = top.require("architectures")
    if architectures != [form.architecture]:
        raise ConfigError(
            "architectures",
            architectures,
            f"[{form.architecture!r}] for model_type {model_type!r}",
        )
    return form


def _text_config(top: _Context, form: ConfigForm) -> Mapping[str, Any]:
    if not form.vision:
        for key in ("text_config", "vision_config"):
            if key in top.config:
                raise ConfigError(
                    key,
                    "{...}",
                    f"absent: model_type {top.config['model_type']!r} is a flat text config",
                )
        return top.config
    text = top.require("text_config")
    if not isinstance(text, Mapping):
        raise ConfigError("text_config", text, "a JSON object")
    if text.get("model_type", form.family.text_model_type) != form.family.text_model_type:
        raise ConfigError(
            "text_config.model_type", text["model_type"], repr(form.family.text_model_type)
        )
    return text


def _check_keys(top: _Context, text: _Context, form: ConfigForm) -> None:
    """Reject keys that are neither read, checked nor known to be inert."""
    text_known = keys.TEXT_ARCHITECTURAL | keys.TEXT_CHECKED.keys() | keys.INERT
    for key in text.config:
        if key not in text_known:
            raise ConfigError(
                text.name(key), text.config[key], "a known key (it might change the weights)"
            )
    for key, supported in keys.TEXT_CHECKED.items():
        text.check_value(key, supported)
    if form.vision:
        for key in top.config:
            if key not in keys.VL_TOP_LEVEL | keys.INERT:
                raise ConfigError(key, top.config[key], "a known key (it might change the weights)")


def _layer_types(text: _Context, num_layers: int) -> tuple[str, ...]:
    names = {"linear_attention": "gdn", "full_attention": "attention"}
    interval = text.get("full_attention_interval", None)
    if interval is not None and (
        not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0
    ):
        raise ConfigError(text.name("full_attention_interval"), interval, "a positive integer")
    explicit = text.get("layer_types", None)
    if explicit is None:
        if interval is None:
            raise ConfigError(
                text.name("layer_types"), MISSING, "layer_types or full_attention_interval"
            )
        return tuple("attention" if (i + 1) % interval == 0 else "gdn" for i in range(num_layers))
    if not isinstance(explicit, list) or len(explicit) != num_layers:
        raise ConfigError(
            text.name("layer_types"),
            explicit,
            f"a list of {num_layers} layer types (num_hidden_layers)",
        )
    for i, kind in enumerate(explicit):
        if kind not in names:
            raise ConfigError(
                text.name(f"layer_types[{i}]"), kind, "'linear_attention' or 'full_attention'"
            )
    types = tuple(names[kind] for kind in explicit)
    if interval is not None:
        from_interval = tuple(
            "attention" if (i + 1) % interval == 0 else "gdn" for i in range(num_layers)
        )
        if from_interval != types:
            text.notes.append(
                f"full_attention_interval {interval} does not describe layer_types; "
                "the explicit layer_types governs, as in transformers"
            )
    return types


def _rope(text: _Context) -> tuple[float, float, dict[str, Any]]:
    """rope_theta, partial_rotary_factor and the rope_parameters dict, from either config style."""
    params = text.get("rope_parameters", None)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(text.name("rope_parameters"), params, "a JSON object")
    for key in params:
        if key not in keys.ROPE_KEYS:
            raise ConfigError(
                text.name(f"rope_parameters.{key}"), params[key], "a known rope parameter"
            )
    if params.get("rope_type", "default") != "default":
        raise ConfigError(text.name("rope_parameters.rope_type"), params["rope_type"], "'default'")
    if text.get("rope_scaling", None) is not None:
        raise ConfigError(
            text.name("rope_scaling"), text.config["rope_scaling"], "null (no rope scaling)"
        )

    def one_of(key: str) -> Any:
        inner, outer = params.get(key, MISSING), text.get(key)
        if inner is not MISSING and outer is not MISSING and inner != outer:
            raise ConfigError(
                text.name(key), outer, f"the same value as rope_parameters.{key} ({inner!r})"
            )
        value = inner if inner is not MISSING else outer
        if value is MISSING:
            raise ConfigError(
                text.name(f"rope_parameters.{key}"),
                MISSING,
                f"{key} in rope_parameters or at the top",
            )
        return value

    theta = text.positive_float("rope_theta", one_of("rope_theta"))
    factor = text.positive_float("partial_rotary_factor", one_of("partial_rotary_factor"))
    if factor > 1:
        raise ConfigError(text.name("partial_rotary_factor"), factor, "a fraction in (0, 1]")
    return theta, factor, dict(params)


def _attention(text: _Context, form: ConfigForm) -> AttentionSpec:
    heads = text.positive_int("num_attention_heads")
    kv_heads = text.positive_int("num_key_value_heads")
    head_dim = text.positive_int("head_dim")
    if heads % kv_heads:
        raise ConfigError(
            text.name("num_key_value_heads"),
            kv_heads,
            f"a divisor of num_attention_heads ({heads})",
        )
    theta, factor, params = _rope(text)
    rotary_dim = head_dim * factor
    if rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
        raise ConfigError(
            text.name("partial_rotary_factor"),
            factor,
            f"a factor giving an even rotary dim of head_dim {head_dim}",
        )
    section = params.get("mrope_section")
    interleaved = params.get("mrope_interleaved")
    if form.vision and section is None:
        raise ConfigError(
            text.name("rope_parameters.mrope_section"),
            MISSING,
            "the multimodal rotary sections of a VL model",
        )
    if section is not None:
        if (
            not isinstance(section, list)
            or len(section) != 3
            or not all(isinstance(s, int) and s >= 0 for s in section)
        ):
            raise ConfigError(
                text.name("rope_parameters.mrope_section"),
                section,
                "three non-negative integers (t, h, w)",
            )
        if 2 * sum(section) != rotary_dim:
            raise ConfigError(
                text.name("rope_parameters.mrope_section"),
                section,
                f"sections summing to half the rotary dim ({int(rotary_dim) // 2})",
            )
        if interleaved is not None and interleaved is not True:
            raise ConfigError(
                text.name("rope_parameters.mrope_interleaved"),
                interleaved,
                "true (transformers always interleaves)",
            )
    return AttentionSpec(
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_percent=factor,
        rope_theta=theta,
        mrope_section=tuple(section) if section is not None else None,
        mrope_interleaved=section is not None,
    )


def _gdn(text: _Context, form: ConfigForm) -> GDNSpec:
    nk = text.positive_int("linear_num_key_heads")
    nv = text.positive_int("linear_num_value_heads")
    if nv % nk:
        raise ConfigError(
            text.name("linear_num_value_heads"), nv, f"a multiple of linear_num_key_heads ({nk})"
        )
    return GDNSpec(
        num_key_heads=nk,
        num_value_heads=nv,
        key_head_dim=text.positive_int("linear_key_head_dim"),
        value_head_dim=text.positive_int("linear_value_head_dim"),
        conv_kernel=text.positive_int("linear_conv_kernel_dim"),
        hf_layout="grouped" if form.family.name == "qwen3_next" else "split",
    )


def _moe(text: _Context, form: ConfigForm) -> MoESpec | None:
    moe_keys = (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    )
    if form.family.name == "qwen3_5":
        for key in (*moe_keys, "norm_topk_prob", "decoder_sparse_step"):
            if key in text.config:
                raise ConfigError(
                    text.name(key), text.config[key], "absent: a dense qwen3_5 model has no experts"
                )
        return None
    if form.family.name == "qwen3_next" and text.get("num_experts") == 0:
        return None
    experts = text.positive_int("num_experts")
    top_k = text.positive_int("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(
            text.name("num_experts_per_tok"), top_k, f"at most num_experts ({experts})"
        )
    if form.family.name == "qwen3_5_moe":
        text.check_value("norm_topk_prob", True)  # Qwen3.5-MoE always renormalises the top-k
        renormalize = True
    else:
        renormalize = text.require("norm_topk_prob")
        if not isinstance(renormalize, bool):
            raise ConfigError(text.name("norm_topk_prob"), renormalize, "true or false")
    return MoESpec(
        num_experts=experts,
        top_k=top_k,
        expert_intermediate_size=text.positive_int("moe_intermediate_size"),
        shared_expert_intermediate_size=text.positive_int("shared_expert_intermediate_size"),
        renormalize=renormalize,
    )


def _mlp_types(text: _Context, form: ConfigForm, num_layers: int) -> tuple[str, ...]:
    only_dense = text.get("mlp_only_layers", [])
    if not isinstance(only_dense, list) or not all(
        isinstance(i, int) and 0 <= i < num_layers for i in only_dense
    ):
        raise ConfigError(
            text.name("mlp_only_layers"), only_dense, f"a list of layer indices below {num_layers}"
        )
    if form.family.name == "qwen3_5":
        return ("dense",) * num_layers
    if form.family.name == "qwen3_5_moe":
        if only_dense:
            raise ConfigError(
                text.name("mlp_only_layers"), only_dense, "[] (every Qwen3.5-MoE layer is MoE)"
            )
        return ("moe",) * num_layers
    if text.get("num_experts") == 0:
        return ("dense",) * num_layers
    step = text.positive_int("decoder_sparse_step")
    return tuple(
        "moe" if i not in only_dense and (i + 1) % step == 0 else "dense" for i in range(num_layers)
    )


def _mtp_layers(text: _Context, form: ConfigForm, weight_map: Mapping[str, str] | None) -> int:
    in_index = None
    if weight_map is not None:
        in_index = len(
            {m.group(1) for k in weight_map if (m := re.match(r"mtp\.layers\.(\d+)\.", k))}
        )
    value = text.get("mtp_num_hidden_layers", None)
    if value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(text.name("mtp_num_hidden_layers"), value, "a non-negative integer")
        if in_index is not None and in_index != value:
            raise ConfigError(
                text.name("mtp_num_hidden_layers"),
                value,
                f"{in_index}, the number of mtp.layers.N in the index",
            )
        return value
    if in_index is not None:
        text.notes.append(f"mtp_layers = {in_index}: counted from mtp.layers.N in the index")
        return in_index
    if form.family.name == "qwen3_next":
        text.notes.append(
            "mtp_layers = 1: assumed for Qwen3-Next (its published checkpoints carry mtp.*)"
        )
        return 1
    raise ConfigError(
        text.name("mtp_num_hidden_layers"),
        MISSING,
        "the number of MTP layers (or an index to count them)",
    )


def _check_mtp_matches_last_layer(
    text: _Context, layer_types: tuple[str, ...], mlp_types: tuple[str, ...], mtp_mlp: str
) -> None:
    """megatron-core builds the MTP layer from the last decoder layer's spec (docs/reference.md section 7)."""
    last = len(layer_types) - 1
    if layer_types[last] != "attention" or mlp_types[last] != mtp_mlp:
        raise ConfigError(
            text.name("mtp_num_hidden_layers"),
            text.get("mtp_num_hidden_layers", 1),
            f"MTP layers only when the last decoder layer has the MTP layer's spec (attention + {mtp_mlp} MLP); "
            f"layer {last} is {layer_types[last]} + {mlp_types[last]}",
        )


def _vision(top: _Context, text_hidden: int) -> VisionSpec:
    raw = top.require("vision_config")
    if not isinstance(raw, Mapping):
        raise ConfigError("vision_config", raw, "a JSON object")
    vis = _Context(raw, "vision_config.")
    for key in raw:
        if key not in keys.VISION_ARCHITECTURAL | keys.VISION_CHECKED.keys() | keys.INERT:
            raise ConfigError(
                vis.name(key), raw[key], "a known vision key (it might change the weights)"
            )
    for key, supported in keys.VISION_CHECKED.items():
        vis.check_value(key, supported)
    if raw.get("model_type", "qwen3_5_vision") not in VISION_MODEL_TYPES:
        raise ConfigError(
            vis.name("model_type"), raw["model_type"], f"one of {sorted(VISION_MODEL_TYPES)}"
        )
    spec = VisionSpec(**{name: vis.positive_int(key) for name, key in _VISION_FIELDS.items()})
    if spec.hidden_size % spec.num_heads:
        raise ConfigError(
            vis.name("num_heads"), spec.num_heads, f"a divisor of hidden_size ({spec.hidden_size})"
        )
    if spec.out_hidden_size != text_hidden:
        raise ConfigError(
            vis.name("out_hidden_size"),
            spec.out_hidden_size,
            f"the text hidden_size ({text_hidden})",
        )
    return spec


_VISION_FIELDS = {
    "depth": "depth",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_heads": "num_heads",
    "in_channels": "in_channels",
    "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size",
    "spatial_merge_size": "spatial_merge_size",
    "out_hidden_size": "out_hidden_size",
    "num_position_embeddings": "num_position_embeddings",
}


def _tie(
    top: _Context, text: _Context, form: ConfigForm, weight_map: Mapping[str, str] | None
) -> bool:
    governing = top if form.vision else text
    tie = governing.require("tie_word_embeddings")
    if not isinstance(tie, bool):
        raise ConfigError(governing.name("tie_word_embeddings"), tie, "true or false")
    if (
        form.vision
        and "tie_word_embeddings" in text.config
        and text.config["tie_word_embeddings"] != tie
    ):
        raise ConfigError(
            text.name("tie_word_embeddings"),
            text.config["tie_word_embeddings"],
            f"the top-level value ({tie}), which governs in VL configs",
        )
    if weight_map is not None and ("lm_head.weight" in weight_map) == tie:
        state = "has" if tie else "lacks"
        raise ConfigError(
            governing.name("tie_word_embeddings"),
            tie,
            f"{not tie}: the index {state} lm_head.weight",
        )
    return tie


def _hf_prefix(
    text: _Context, form: ConfigForm, weight_map: Mapping[str, str] | None, choices: LayoutChoices
) -> str:
    """Prefix of HF language-model tensor names; text-only Qwen3.5 checkpoints occur with both."""
    allowed = ("model.language_model.",) if form.vision else ("model.",)
    if form.family.name != "qwen3_next" and not form.vision:
        allowed = ("model.", "model.language_model.")
    found = None
    if weight_map is not None:
        found = [p for p in allowed if f"{p}embed_tokens.weight" in weight_map]
        if len(found) != 1:
            raise ConfigError(
                "<index>",
                f"embed_tokens under {found or 'no known prefix'}",
                f"exactly one of {list(allowed)}",
            )
        found = found[0]
    if choices.hf_prefix is not None:
        if choices.hf_prefix not in allowed:
            raise ConfigError("--hf-prefix", choices.hf_prefix, f"one of {list(allowed)}")
        if found is not None and found != choices.hf_prefix:
            raise ConfigError(
                "--hf-prefix", choices.hf_prefix, f"{found!r}, the prefix in the index"
            )
        return choices.hf_prefix
    if found is not None:
        return found
    if len(allowed) > 1:
        text.notes.append(
            "hf_prefix 'model.': assumed without an index; pass --hf-prefix model.language_model. if needed"
        )
    return allowed[0]


def _quantization(
    top: _Context, text: _Context, form: ConfigForm, weight_map: Mapping[str, str] | None
) -> QuantizationSpec | None:
    raw = top.get("quantization_config", None)
    if form.vision and "quantization_config" in text.config:
        raise ConfigError(
            text.name("quantization_config"),
            "{...}",
            "quantization_config at the top level of a VL config",
        )
    scaled = weight_map is not None and any(k.endswith(".weight_scale_inv") for k in weight_map)
    if raw is None:
        if scaled:
            raise ConfigError(
                "quantization_config",
                MISSING,
                "an FP8 description: the index has weight_scale_inv tensors",
            )
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("quantization_config", raw, "a JSON object")
    q = _Context(raw, "quantization_config.")
    method = q.require("quant_method")
    if method != "fp8":
        algo = f" {raw['quant_algo']}" if raw.get("quant_algo") else ""
        raise ConfigError(
            q.name("quant_method"),
            f"{method}{algo}",
            "'fp8' (block-quantised e4m3); ModelOpt (NVFP4, MXFP8, ...), compressed-tensors and "
            "other quantised formats are not supported",
        )
    for key in raw:
        if key not in keys.QUANTIZATION_KEYS:
            raise ConfigError(q.name(key), raw[key], "a known FP8 quantization key")
    if q.require("fmt") != "e4m3":
        raise ConfigError(q.name("fmt"), raw["fmt"], "'e4m3'")
    block = q.require("weight_block_size")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ConfigError(q.name("weight_block_size"), block, "two positive integers")
    skip = raw.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise ConfigError(q.name("modules_to_not_convert"), skip, "a list of module names")
    if weight_map is not None and not scaled:
        raise ConfigError(
            "quantization_config",
            "fp8",
            "no quantization: the index has no weight_scale_inv tensors",
        )
    return QuantizationSpec(
        method="fp8",
        fmt="e4m3",
        weight_block_size=(block[0], block[1]),
        activation_scheme=str(q.require("activation_scheme")),
        modules_to_not_convert=tuple(skip),
    )


def _decoder_layout_in_index(
    weight_map: Mapping[str, str] | None, prefix: str, mlp_types: tuple[str, ...]
) -> str | None:
    if weight_map is None or "moe" not in mlp_types:
        return None
    layer = mlp_types.index("moe")
    return _layout_of(weight_map, f"{prefix}layers.{layer}.mlp.experts.")


def _mtp_layout_in_index(weight_map: Mapping[str, str] | None) -> str | None:
    return None if weight_map is None else _layout_of(weight_map, "mtp.layers.0.mlp.experts.")


def _layout_of(weight_map: Mapping[str, str], experts: str) -> str:
    packed = f"{experts}gate_up_proj" in weight_map
    per_expert = f"{experts}0.gate_proj.weight" in weight_map
    if packed == per_expert:
        found = "both layouts" if packed else "neither layout"
        raise ConfigError(
            "<index>",
            f"{experts}* ({found})",
            "packed gate_up_proj or per-expert {e}.gate_proj.weight",
        )
    return "packed" if packed else "per_expert"


def _experts_layout(
    text: _Context,
    what: str,
    from_index: str | None,
    statement: Statement | None,
    choice: str | None,
    family_default: str | None,
) -> str | None:
    """Index, else catalog statement, else the user's choice, else the family's published layout."""
    option = "--experts" if what == "experts_layout" else "--mtp-experts"
    if choice is not None and choice not in EXPERTS_LAYOUTS:
        raise ConfigError(option, choice, "packed or per_expert")
    decided = None
    if from_index is not None:
        decided, source = from_index, "the index"
    elif statement is not None:
        decided, source = statement.value, "the catalog"
        text.notes.append(
            f"{what} {statement.value}: stated by the catalog ({statement.provenance})"
        )
    if decided is not None:
        if choice is not None and choice != decided:
            raise ConfigError(option, choice, f"{decided!r}, the layout in {source}")
        return decided
    if choice is not None:
        text.notes.append(f"{what} {choice}: chosen with {option}")
        return choice
    if family_default is not None:
        text.notes.append(
            f"{what} {family_default}: the family's published layout, assumed without an index (override with {option})"
        )
        return family_default
    text.notes.append(
        f"{what} unknown: neither an index nor the catalog says how MTP experts are stored; choose with {option}"
    )
    return None
