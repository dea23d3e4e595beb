"""`codegen convert gpt-to-hybrid` and `hybrid-to-gpt`: a Megatron checkpoint written by
`codegen convert` moved between the GPTModel and HybridModel layouts, with no HF step between."""

from __future__ import annotations

from pathlib import Path

from qwen35_bridge import retarget as runtime
from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.record import FORMATS, RECORD_NAME, Record
from qwen35_bridge.offline import Report, record_root
from qwen35_bridge.workers import Workers
from qwen35_codegen.cli.progress import for_terminal
from qwen35_codegen.registry.lookup import bridge_for_spec, recorded_spec


def retarget(
    src: Path,
    dst: Path,
    source_target: str,
    target: str,
    *,
    output_format: str | None,
    bridge_dir: Path | None,
    force: bool,
    max_shard_bytes: int,
    quiet: bool,
    budget: int | None,
    workers: Workers,
) -> Report:
    """`src` (its record must say `source_target`) rewritten under `target`'s names; in the
    source's format unless `output_format` names one."""
    root = record_root(src)
    if root is None:
        raise ConversionError(
            f"{src}: no {RECORD_NAME}; {source_target}-to-{target} converts checkpoints written by "
            "codegen convert (a trainer's checkpoint goes through megatron-to-hf with --hf-config)"
        )
    record, spec = recorded_spec(root)
    if record.target != source_target:
        raise ConversionError(
            f"{src}: holds {record.target} tensors, as its {RECORD_NAME} records, not "
            f"{source_target} ones; use `codegen convert {record.target}-to-{target}`"
            if record.target != target
            else f"{src}: already holds {target} tensors, as its {RECORD_NAME} records"
        )
    if workers.size > 1:
        raise ConversionError(
            f"{source_target}-to-{target} runs in one process (it renames tensors); drop --workers"
        )
    fmt = output_format or _format_name(record)
    source = bridge_for_spec(
        spec, record.model_id, bridge_dir=bridge_dir, quiet=quiet, target=source_target
    )
    destination = bridge_for_spec(
        spec, record.model_id, bridge_dir=bridge_dir, quiet=quiet, target=target
    )
    progress = for_terminal(f"{src.name} -> {target}", quiet=quiet)
    return runtime.retarget(
        source,
        destination,
        src,
        dst,
        record=record,
        output_format=fmt,
        max_shard_bytes=max_shard_bytes,
        force=force,
        progress=progress,
        budget=budget,
    )


def _format_name(record: Record) -> str:
    """The `--format` value of the record's format."""
    return next(name for name, value in FORMATS.items() if value == record.format)
