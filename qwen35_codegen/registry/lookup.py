"""Find the bridge for a checkpoint or a spec and a target model class: a committed one whose
recorded spec fingerprint and target match, or one generated on the spot into a cache folder (never
into qwen35_bridge/generated/, which holds reviewed code).

A Megatron checkpoint written by `codegen convert` records its spec; `recorded_spec` holds that
record against itself and against the HF config kept beside it before any tensor is read.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from qwen35_bridge.bridge import BridgeBase
from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.record import (
    HF_CONFIG_NAME,
    RECORD_NAME,
    Record,
    read_hf_config,
)
from qwen35_bridge.paths import INDEX_NAME, SINGLE_FILE_NAME, cache_root
from qwen35_bridge.targets import DEFAULT_TARGET
from qwen35_codegen import checkout, sources
from qwen35_codegen.errors import CodegenError
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.rendering.bridge_module import (
    Origin,
    build_digest,
    module_name,
    render_bridge,
    write_atomic,
)
from qwen35_codegen.review.spec_changes import spec_changes
from qwen35_codegen.spec import LayoutChoices, ModelSpec, infer_spec

GENERATED_PACKAGE = "qwen35_bridge.generated"


def find_committed(spec: ModelSpec, target: str = DEFAULT_TARGET) -> str | None:
    """The module name of a committed bridge with exactly this spec and target, if any."""
    fingerprint = spec.fingerprint()
    for entry in bridge_index.read(checkout.GENERATED).values():
        if entry.spec_sha256 == fingerprint and entry.target == target:
            return entry.module
    return None


def bridge_for(
    spec: ModelSpec,
    model_id: str,
    origin: Origin,
    *,
    bridge_dir: Path | None = None,
    target: str = DEFAULT_TARGET,
) -> tuple[BridgeBase, str]:
    """A bridge instance for `spec` and `target`, and where its module is (for the user to read).
    A bridge generated earlier by this same build for this spec and target is reused without
    rendering it again."""
    if spec.needs_mtp_experts_choice:
        raise CodegenError(
            f"{model_id}: how the MTP layer's experts are stored is unknown (no index, no catalog "
            "statement); pass --mtp-experts packed|per_expert"
        )
    committed = find_committed(spec, target)
    if committed is not None:
        module = importlib.import_module(f"{GENERATED_PACKAGE}.{committed}")
        return module.Bridge(), f"qwen35_bridge/generated/{committed}.py (committed)"
    folder = bridge_dir or cache_root() / "bridges"
    stem = module_name(model_id) + ("" if target == DEFAULT_TARGET else f"_{target}")
    path = folder / f"{stem}_{spec.fingerprint()[:12]}_{build_digest()[:8]}.py"
    if not path.is_file():
        write_atomic(path, render_bridge(spec, model_id, origin, target))
    return _load_file(path).Bridge(), f"{path} (generated for this conversion)"


def bridge_for_checkpoint(
    directory: Path,
    *,
    bridge_dir: Path | None = None,
    quiet: bool = False,
    target: str = DEFAULT_TARGET,
) -> tuple[BridgeBase, ModelSpec, sources.Source]:
    """The bridge for `target` whose spec matches an HF checkpoint folder's config and index."""
    from qwen35_codegen.pipeline import command_of

    source = sources.resolve(str(directory), repo_root=checkout.REPO_ROOT)
    if source.weight_map is None:
        raise ConversionError(f"{directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME}")
    spec = infer_spec(source.config, weight_map=source.weight_map)
    origin = Origin(
        source.ref,
        source.provenance,
        source.config_sha256,
        source.index_sha256,
        command_of(source.ref, {} if target == DEFAULT_TARGET else {"target": target}),
    )
    bridge, where = bridge_for(spec, source.model_id, origin, bridge_dir=bridge_dir, target=target)
    _say(f"bridge: {where}", quiet)
    return bridge, spec, source


def bridge_for_spec(
    spec: ModelSpec,
    model_id: str,
    *,
    bridge_dir: Path | None = None,
    quiet: bool = False,
    target: str = DEFAULT_TARGET,
) -> BridgeBase:
    """The bridge for a spec (and target) recorded with a Megatron checkpoint."""
    origin = Origin(
        f"spec {spec.fingerprint()}",
        "recorded with a Megatron checkpoint",
        "n/a",
        None,
        "codegen convert",
    )
    bridge, where = bridge_for(spec, model_id, origin, bridge_dir=bridge_dir, target=target)
    _say(f"bridge: {where}", quiet)
    return bridge


def recorded_spec(src: Path) -> tuple[Record, ModelSpec]:
    """The record a Megatron checkpoint keeps and its spec, held against itself and against the
    HF config kept beside it: a record edited by hand, or an HF config that is not the model's,
    would convert the tensors of one model with the layout rules of another."""
    record = Record.read(src)
    where = src / RECORD_NAME
    try:
        spec = ModelSpec.from_dict(record.spec)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{where}: its spec is not one codegen writes ({e!r})") from None
    if spec.fingerprint() != record.spec_sha256:
        raise ConversionError(
            f"{where}: its spec does not match its spec_sha256; the record was edited"
        )
    config_path = src / HF_CONFIG_NAME
    config = read_hf_config(src)
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


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def _load_file(path: Path) -> ModuleType:
    name = f"_codegen_bridge_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
