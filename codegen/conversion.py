"""`codegen convert`: pick (or generate) the bridge for a checkpoint, then convert on disk."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from codegen import bridges, sources
from codegen.errors import CodegenError, ConversionError
from codegen.generator import REPO_ROOT, command_of
from codegen.progress import for_terminal
from codegen.render import Origin
from codegen.runtime import convert as runtime_convert
from codegen.runtime.bridge import BridgeBase
from codegen.runtime.mappings import ConvertOptions
from codegen.spec import ModelSpec, infer_spec
from codegen.spec.infer import LayoutChoices
from codegen.spec_diff import spec_changes


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def bridge_for_checkpoint(
    directory: Path, *, bridge_dir: Path | None = None, quiet: bool = False
) -> tuple[BridgeBase, ModelSpec, sources.Source]:
    """The bridge whose spec matches an HF checkpoint folder's config and index."""
    source = sources.resolve(str(directory), repo_root=REPO_ROOT)
    if source.weight_map is None:
        raise ConversionError(f"{directory}: no model.safetensors.index.json or model.safetensors")
    spec = infer_spec(source.config, weight_map=source.weight_map)
    origin = Origin(
        source.ref,
        source.provenance,
        source.config_sha256,
        source.index_sha256,
        command_of(source.ref, {}),
    )
    bridge, where = bridges.bridge_for(spec, source.model_id, origin, bridge_dir=bridge_dir)
    _say(f"bridge: {where}", quiet)
    return bridge, spec, source


def bridge_for_spec(
    spec: ModelSpec, model_id: str, *, bridge_dir: Path | None = None, quiet: bool = False
) -> BridgeBase:
    origin = Origin(
        f"spec {spec.fingerprint()}",
        "recorded with a Megatron checkpoint",
        "n/a",
        None,
        "codegen convert",
    )
    bridge, where = bridges.bridge_for(spec, model_id, origin, bridge_dir=bridge_dir)
    _say(f"bridge: {where}", quiet)
    return bridge


def hf_to_megatron(
    src: Path,
    dst: Path,
    *,
    output_format: str = "safetensors",
    bridge_dir: Path | None = None,
    force: bool = False,
    max_shard_bytes: int,
    allow_norm_rounding: bool = False,
    dequantize_to: str = "bfloat16",
    quiet: bool = False,
) -> runtime_convert.Report:
    bridge, spec, source = bridge_for_checkpoint(src, bridge_dir=bridge_dir, quiet=quiet)
    record: dict[str, Any] = {
        "model_id": source.model_id,
        "spec_sha256": spec.fingerprint(),
        "spec": spec.to_dict(),
        "bridge_module": type(bridge).__module__,
    }
    options = ConvertOptions(allow_norm_rounding=allow_norm_rounding)
    progress = for_terminal(f"{src.name} -> Megatron", quiet=quiet)
    return runtime_convert.hf_to_megatron(
        bridge,
        src,
        dst,
        record=record,
        options=options,
        max_shard_bytes=max_shard_bytes,
        force=force,
        progress=progress,
        dequantize_to=getattr(torch, dequantize_to),
        output_format=output_format,
    )


def megatron_to_hf(
    src: Path,
    dst: Path,
    *,
    experts: str | None = None,
    mtp_experts: str | None = None,
    fp8: bool = False,
    allow_norm_rounding: bool = False,
    bridge_dir: Path | None = None,
    force: bool = False,
    max_shard_bytes: int,
    quiet: bool = False,
) -> runtime_convert.Report:
    record, spec = recorded_spec(src)
    spec = _with_layouts(spec, experts, mtp_experts)
    if fp8 and spec.quantization is None:
        raise ConversionError(
            f"--fp8: {src} was not converted from an FP8 checkpoint; there is no block size or tensor list to quantise with"
        )
    if not fp8:
        spec = dataclasses.replace(spec, quantization=None)
    bridge = bridge_for_spec(spec, record["model_id"], bridge_dir=bridge_dir, quiet=quiet)
    progress = for_terminal(f"{src.name} -> HF", quiet=quiet)
    return runtime_convert.megatron_to_hf(
        bridge,
        src,
        dst,
        max_shard_bytes=max_shard_bytes,
        force=force,
        progress=progress,
        fp8_tensors=record.get("fp8_tensors", ()),
        options=ConvertOptions(allow_norm_rounding=allow_norm_rounding),
    )


def recorded_spec(src: Path) -> tuple[dict[str, Any], ModelSpec]:
    """The record a Megatron checkpoint keeps (`codegen.json`) and its spec, held against itself
    and against the HF config kept beside it: a record edited by hand, or an HF config that is not
    the model's, would convert the tensors of one model with the layout rules of another."""
    record = runtime_convert.read_record(src)
    where = src / runtime_convert.RECORD
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise ConversionError(f"{where}: not a record written by codegen convert (no spec)")
    if not isinstance(record.get("model_id"), str) or not record["model_id"]:
        raise ConversionError(f"{where}: no model_id")
    if record.get("format", runtime_convert.MEGATRON_SAFETENSORS) not in (
        runtime_convert.FORMATS.values()
    ):
        raise ConversionError(f"{where}: unknown format {record.get('format')!r}")
    try:
        spec = ModelSpec.from_dict(record["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: its spec is not one codegen writes ({e!r})") from None
    if spec.fingerprint() != record.get("spec_sha256"):
        raise ConversionError(
            f"{where}: its spec does not match its spec_sha256; the record was edited"
        )
    config_path = src / runtime_convert.HF_CONFIG
    try:
        config = json.loads(config_path.read_bytes())  # UTF-8, -16 or -32, as sources.py reads it
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path}: cannot read the HF config ({e})") from None
    choices = LayoutChoices(spec.experts_layout, spec.mtp_experts_layout, spec.hf_prefix)
    try:
        from_config = infer_spec(config, choices=choices)
    except CodegenError as e:
        raise ConversionError(f"{config_path}: {e}") from None
    if from_config.fingerprint() != spec.fingerprint():
        changed = spec_changes(spec, from_config)
        first = (changed.fields + changed.layers + changed.layouts or ["?"])[0]
        raise ConversionError(
            f"{config_path}: describes another model than {where} records ({first})"
        )
    return record, spec


def _with_layouts(spec: ModelSpec, experts: str | None, mtp_experts: str | None) -> ModelSpec:
    """The spec of the same model stored with other expert layouts on the HF side."""
    changes: dict[str, Any] = {}
    if experts is not None:
        if spec.moe is None:
            raise ConversionError(f"--experts {experts}: this model has no experts")
        changes["experts_layout"] = experts
        changes["mtp_experts_layout"] = spec.mtp_experts_layout and (mtp_experts or experts)
    if mtp_experts is not None:
        if spec.mtp_mlp_type != "moe":
            raise ConversionError(f"--mtp-experts {mtp_experts}: this model has no MTP experts")
        changes["mtp_experts_layout"] = mtp_experts
    return dataclasses.replace(spec, **changes) if changes else spec
