"""`codegen convert`: pick (or generate) the bridge for a checkpoint, then convert on disk."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from qwen35_bridge import offline
from qwen35_bridge.bridge import BridgeBase
from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.record import RECORD_NAME, Record
from qwen35_bridge.mapping.kinds import ConvertOptions
from qwen35_bridge.targets import DEFAULT_TARGET
from qwen35_bridge.workers import SINGLE, Workers
from qwen35_codegen import checkout, sources
from qwen35_codegen.cli.progress import for_terminal
from qwen35_codegen.registry.lookup import (
    bridge_for_checkpoint,
    bridge_for_spec,
    recorded_spec,
)
from qwen35_codegen.spec import LayoutChoices, ModelSpec, infer_spec


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
    run_layout: str | None = None,
    quiet: bool = False,
    target: str = DEFAULT_TARGET,
    budget: int | None = offline.DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> offline.Report:
    if run_layout is not None and output_format != "torch_dist":
        raise ConversionError(
            f"--run-layout {run_layout}: a run tree holds a torch_dist checkpoint; add --format torch_dist"
        )
    if run_layout == offline.RUN_MEGATRON_BRIDGE and target != DEFAULT_TARGET:
        raise ConversionError(
            f"--run-layout {run_layout}: Megatron-Bridge's run tree is written for GPTModel only, "
            f"not --target {target}"
        )
    bridge, spec, source = bridge_for_checkpoint(
        src, bridge_dir=bridge_dir, quiet=quiet, target=target
    )
    record = Record(
        model_id=source.model_id,
        spec_sha256=spec.fingerprint(),
        spec=spec.to_dict(),
        bridge_module=type(bridge).__module__,
        target=target,
    )
    options = ConvertOptions(allow_norm_rounding=allow_norm_rounding)
    progress = for_terminal(f"{src.name} -> Megatron", quiet=quiet)
    return offline.hf_to_megatron(
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
        run_layout=run_layout or offline.RUN_MEGATRON_LM,
        budget=budget,
        workers=workers,
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
    hf_config: str | None = None,
    iteration: int | None = None,
    target: str | None = None,
    budget: int | None = offline.DEFAULT_MEMORY_BUDGET,
    workers: Workers = SINGLE,
) -> offline.Report:
    root = offline.record_root(src)
    if root is None:
        return _training_to_hf(
            src,
            dst,
            hf_config=hf_config,
            iteration=iteration,
            target=target or DEFAULT_TARGET,
            experts=experts,
            mtp_experts=mtp_experts,
            fp8=fp8,
            allow_norm_rounding=allow_norm_rounding,
            bridge_dir=bridge_dir,
            force=force,
            max_shard_bytes=max_shard_bytes,
            quiet=quiet,
            budget=budget,
            workers=workers,
        )
    if hf_config is not None or iteration is not None:
        raise ConversionError(
            f"--hf-config/--iteration: {src} was written by codegen convert, whose record names "
            "its model; they are for a trainer's checkpoint"
        )
    record, spec = recorded_spec(root)
    if target is not None and target != record.target:
        raise ConversionError(
            f"--target {target}: {src} holds {record.target} tensors, as its {RECORD_NAME} "
            f"records; convert it with `codegen convert {record.target}-to-{target}` first"
        )
    spec = _with_layouts(spec, experts, mtp_experts)
    if fp8 and spec.quantization is None:
        raise ConversionError(
            f"--fp8: {src} was not converted from an FP8 checkpoint; there is no block size or tensor list to quantise with"
        )
    if not fp8:
        spec = dataclasses.replace(spec, quantization=None)
    bridge = bridge_for_spec(
        spec, record.model_id, bridge_dir=bridge_dir, quiet=quiet, target=record.target
    )
    progress = for_terminal(f"{src.name} -> HF", quiet=quiet)
    return offline.megatron_to_hf(
        bridge,
        src,
        dst,
        max_shard_bytes=max_shard_bytes,
        force=force,
        progress=progress,
        fp8_tensors=record.fp8_tensors,
        budget=budget,
        workers=workers,
        options=ConvertOptions(allow_norm_rounding=allow_norm_rounding),
    )


def _training_to_hf(
    src: Path,
    dst: Path,
    *,
    hf_config: str | None,
    iteration: int | None,
    target: str,
    experts: str | None,
    mtp_experts: str | None,
    fp8: bool,
    allow_norm_rounding: bool,
    bridge_dir: Path | None,
    force: bool,
    max_shard_bytes: int,
    quiet: bool,
    budget: int | None,
    workers: Workers,
) -> offline.Report:
    """A trainer's checkpoint: it records no model, so `--hf-config` names it (a folder with a
    config.json, an HF checkpoint, or any generator reference) and picks the bridge."""
    if fp8:
        raise ConversionError("--fp8: a trainer's checkpoint records no FP8 scope to restore")
    bridge, _spec, source = bridge_for_model(
        src,
        hf_config,
        experts=experts,
        mtp_experts=mtp_experts,
        bridge_dir=bridge_dir,
        quiet=quiet,
        target=target,
    )
    progress = for_terminal(f"{src.name} -> HF", quiet=quiet)
    report = offline.training_to_hf(
        bridge,
        src,
        dst,
        config=source.config,
        config_dir=source.directory,
        iteration=iteration,
        max_shard_bytes=max_shard_bytes,
        force=force,
        progress=progress,
        options=ConvertOptions(allow_norm_rounding=allow_norm_rounding),
        budget=budget,
        workers=workers,
    )
    if not quiet:
        print(f"read {report.folder}", file=sys.stderr)
        if report.ignored:
            print(
                f"ignored {len(report.ignored)} entries of the training state (optimizer, RNG, "
                f"args; never read), e.g. {report.ignored[0]}",
                file=sys.stderr,
            )
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
    return report


def bridge_for_model(
    src: Path,
    hf_config: str | None,
    *,
    experts: str | None = None,
    mtp_experts: str | None = None,
    bridge_dir: Path | None = None,
    quiet: bool = False,
    target: str = DEFAULT_TARGET,
) -> tuple[BridgeBase, ModelSpec, sources.Source]:
    """The bridge for a trainer's checkpoint `src`, whose model `hf_config` names (its HF
    tensors unquantised, their expert layouts the reference's or as asked) and which model
    class `target` says wrote it, and its spec."""
    if hf_config is None:
        raise ConversionError(
            f"{src}: no {RECORD_NAME}, so not written by codegen convert; for a trainer's "
            "checkpoint (Megatron-LM or Megatron-Bridge run) pass --hf-config DIR|REF naming the model"
        )
    source = sources.resolve(hf_config, repo_root=checkout.REPO_ROOT)
    choices = LayoutChoices(experts=experts, mtp_experts=mtp_experts)
    spec = infer_spec(
        source.config, weight_map=source.weight_map, statements=source.statements, choices=choices
    )
    spec = dataclasses.replace(spec, quantization=None)
    bridge = bridge_for_spec(
        spec, source.model_id, bridge_dir=bridge_dir, quiet=quiet, target=target
    )
    return bridge, spec, source


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


def plan(
    direction: str,
    src: Path,
    *,
    output_format: str = "safetensors",
    run_layout: str | None = None,
    hf_config: str | None = None,
    iteration: int | None = None,
    experts: str | None = None,
    mtp_experts: str | None = None,
    target: str | None = None,
    max_shard_bytes: int,
    budget: int | None,
    workers: int,
    bridge_dir: Path | None = None,
) -> str:
    """`convert --plan`: what the conversion would do, from the source's metadata (its headers),
    or from a config alone (`src` a generator REF for hf-to-megatron; `--hf-config` for a
    megatron-to-hf source that is not there), whose dtype every tensor is then taken to have."""
    from contextlib import ExitStack

    from qwen35_bridge.formats.safetensors.reader import CheckpointReader
    from qwen35_bridge.planning import plan_conversion

    with ExitStack() as stack:
        if direction == "hf-to-megatron":
            side, other = "hf", "megatron"
            if _has_weights(src):
                bridge, _spec, _ = bridge_for_checkpoint(
                    src, bridge_dir=bridge_dir, quiet=True, target=target or DEFAULT_TARGET
                )
                reader = stack.enter_context(CheckpointReader(src))
                dtype_of, read_from = reader.dtype, f"{src} (its headers)"
            else:
                bridge, dtype_of, read_from = _bridge_from_config(
                    str(src), experts, mtp_experts, target, bridge_dir
                )
        else:
            side, other, output_format = "megatron", "hf", "safetensors"
            if Path(src).exists():
                bridge, _target = _megatron_bridge(
                    src, hf_config, experts, mtp_experts, target, bridge_dir
                )
                reader = stack.enter_context(offline.megatron_reader(bridge, src, iteration))
                dtype_of, read_from = reader.dtype, f"{reader.directory} (its metadata)"
            elif hf_config is None:
                raise ConversionError(
                    f"{src}: not there; to plan from a config alone, pass --hf-config"
                )
            else:
                bridge, dtype_of, read_from = _bridge_from_config(
                    hf_config, experts, mtp_experts, target, bridge_dir
                )
        folder, extra, chunks_of = "", ["config.json"], None
        if direction == "hf-to-megatron":
            extra = ["codegen.json", "hf_config.json"]
        if output_format == "torch_dist":
            from qwen35_bridge.formats import megatron_bridge, megatron_lm, torch_dist

            bridge_tree = run_layout == offline.RUN_MEGATRON_BRIDGE
            folder = ("iter_0000000" if bridge_tree else megatron_lm.RELEASE) + "/"
            extra += [megatron_lm.TRACKER_NAME]
            if bridge.target == DEFAULT_TARGET:
                extra += [megatron_lm.PRETRAIN_ARGS_NAME]
            if bridge_tree:
                extra += [
                    f"{folder}{megatron_bridge.RUN_CONFIG_NAME}",
                    megatron_bridge.LATEST_TRAIN_STATE_NAME,
                ]
            pieces: dict[str, int] = {}
            for piece in torch_dist.layout(bridge).pieces:  # built on the meta device, or cached
                pieces[piece.param] = pieces.get(piece.param, 0) + 1
            chunks_of = pieces.__getitem__
        made = plan_conversion(
            bridge.groups,
            dtype_of,
            source_side=side,
            target_side=other,
            output_format=output_format,
            max_shard_bytes=max_shard_bytes,
            budget=budget,
            workers=workers,
            data_folder=folder,
            extra_files=extra,
            chunks_of=chunks_of,
        )
    header = (
        f"plan: {direction} of {bridge.model_id} ({type(bridge).__name__} in "
        f"{type(bridge).__module__}), {output_format}; tensors as read from {read_from}\n"
    )
    return header + made.render()


def _has_weights(folder: Path) -> bool:
    from qwen35_bridge.paths import INDEX_NAME, SINGLE_FILE_NAME

    return Path(folder).is_dir() and any(
        (Path(folder) / n).is_file() for n in (INDEX_NAME, SINGLE_FILE_NAME)
    )


def _bridge_from_config(
    ref: str,
    experts: str | None,
    mtp_experts: str | None,
    target: str | None,
    bridge_dir: Path | None,
) -> tuple[BridgeBase, Any, str]:
    """The bridge of a config alone, and every tensor in the config's dtype (bf16 if it names
    none; an FP8 release's quantised weights counted dequantised, in bf16)."""
    bridge, _spec, source = bridge_for_model(
        Path(ref),
        ref,
        experts=experts,
        mtp_experts=mtp_experts,
        bridge_dir=bridge_dir,
        quiet=True,
        target=target or DEFAULT_TARGET,
    )
    config = source.config.get("text_config") or source.config
    name = config.get("dtype") or config.get("torch_dtype") or source.config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16
    if dtype.itemsize == 1:
        dtype = torch.bfloat16
    return (
        bridge,
        lambda _name: dtype,
        f"{source.ref} (a config alone: every tensor {str(dtype).removeprefix('torch.')})",
    )


def _megatron_bridge(
    src: Path,
    hf_config: str | None,
    experts: str | None,
    mtp_experts: str | None,
    target: str | None,
    bridge_dir: Path | None,
) -> tuple[BridgeBase, str]:
    """The bridge of a Megatron checkpoint: from its record, else (a trainer's) from --hf-config."""
    root = offline.record_root(src)
    if root is None:
        bridge, _spec, _source = bridge_for_model(
            src,
            hf_config,
            experts=experts,
            mtp_experts=mtp_experts,
            bridge_dir=bridge_dir,
            quiet=True,
            target=target or DEFAULT_TARGET,
        )
        return bridge, bridge.target
    record, spec = recorded_spec(root)
    spec = dataclasses.replace(_with_layouts(spec, experts, mtp_experts), quantization=None)
    bridge = bridge_for_spec(
        spec, record.model_id, bridge_dir=bridge_dir, quiet=True, target=record.target
    )
    return bridge, record.target
