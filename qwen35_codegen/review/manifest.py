"""Key manifests: what a bridge's mapping table maps, in a form a reviewer reads in a minute.

`qwen35_bridge/generated/<module>.manifest.json` sits beside each bridge: the model, the parameters per
component, and for each side (HF, Megatron) the number of tensors, the sha256 of their sorted names
(one per line, each ending in a newline: `LC_ALL=C sort | sha256sum` agrees) and the key families
with their index ranges, counts and shapes. It is computed from the module's table alone, so a
table edited by hand no longer matches its manifest, and `check` names the family that changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from qwen35_bridge.bridge import BridgeBase
from qwen35_codegen import __version__
from qwen35_codegen.errors import CodegenError
from qwen35_codegen.review.components import parameter_counts
from qwen35_codegen.review.key_families import (
    PLACEHOLDERS,
    KeyFamily,
    Shape,
    families_of,
    format_ranges,
    parse_ranges,
)

SUFFIX = ".manifest.json"
SIDES = {"hf": "HF", "megatron": "Megatron"}
Manifest = dict[str, Any]


def file_name(module: str) -> str:
    return f"{module}{SUFFIX}"


def load_bridge(text: str, filename: str) -> BridgeBase:
    """The Bridge of a module's source, run in a fresh namespace: the table exactly as written,
    whatever an earlier import cached. Expanding it needs no torch."""
    namespace: dict[str, Any] = {"__name__": f"_manifest_of_{filename.removesuffix('.py')}"}
    exec(
        compile(text, filename, "exec"), namespace
    )  # noqa: S102 - the repository's own generated code
    bridge = namespace.get("Bridge")
    if not (isinstance(bridge, type) and issubclass(bridge, BridgeBase)):
        raise CodegenError(f"{filename} defines no Bridge class (a subclass of BridgeBase)")
    return bridge()


def key_set_sha256(keys: Iterable[str]) -> str:
    return hashlib.sha256("".join(f"{key}\n" for key in sorted(keys)).encode()).hexdigest()


def build(bridge: BridgeBase) -> Manifest:
    """The manifest of a bridge's expanded table."""
    return {
        "generator": f"codegen {__version__}",
        "model_id": bridge.model_id,
        "spec_sha256": bridge.spec_sha256,
        "parameters": parameter_counts(bridge.megatron_shapes, bridge.megatron_prefix),
        "hf": _side(bridge.hf_shapes),
        "megatron": _side(bridge.megatron_shapes),
    }


def _side(shapes: dict[str, Shape]) -> dict[str, Any]:
    entries = {}
    for pattern, family in families_of(shapes).items():
        ranges = {p: format_ranges(r) for p, r in zip(family.placeholders, family.ranges)}
        entries[pattern] = ranges | {"count": family.count, "shape": list(family.shape)}
    return {"keys": len(shapes), "key_set_sha256": key_set_sha256(shapes), "families": entries}


def render(manifest: Manifest) -> str:
    """Deterministic JSON, one family per line so that a diff of two manifests reads family by family."""
    return _dump(manifest, 0) + "\n"


def _dump(value: Any, level: int) -> str:
    family = level == 3  # manifest -> side -> families -> pattern
    if not isinstance(value, dict) or family:
        return json.dumps(value, separators=(", ", ": "))
    pad = "  " * (level + 1)
    items = (f"{pad}{json.dumps(key)}: {_dump(item, level + 1)}" for key, item in value.items())
    return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"


@functools.lru_cache(maxsize=16)
def of_module(text: str, module: str) -> str:
    """The manifest text of a bridge module's source. Cached: `check` regenerates a module and then
    verifies the same text on disk, and expanding a large table takes a second."""
    return render(build(load_bridge(text, f"{module}.py")))


def parse(text: str, name: str) -> Manifest:
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise CodegenError(f"{name}: not valid JSON ({e})") from None
    sections = [manifest.get(side) if isinstance(manifest, dict) else None for side in SIDES]
    if not all(
        isinstance(section, dict) and isinstance(section.get("families"), dict)
        for section in sections
    ):
        raise CodegenError(
            f"{name}: not a key manifest (expected an object with {' and '.join(SIDES)} sections of families)"
        )
    return manifest


def families(manifest: Manifest, side: str) -> list[KeyFamily]:
    """The families of one side, ranges parsed back: `KeyFamily.keys()` lists every tensor."""
    result = []
    for pattern, entry in manifest[side]["families"].items():
        ranges = tuple(parse_ranges(entry[p]) for p in PLACEHOLDERS if "{" + p + "}" in pattern)
        result.append(KeyFamily(pattern, ranges, entry["count"], tuple(entry["shape"])))
    return result


@dataclass(frozen=True)
class Change:
    """One difference between two manifests' families, from `old` to `new`."""

    side: str
    pattern: str
    what: Literal["removed", "added", "shape", "ranges", "count"]
    old: Any = None
    new: Any = None


def family_changes(old: Manifest, new: Manifest) -> list[Change]:
    """Family by family, per side: what `new` removes, adds, re-shapes or re-ranges."""
    changes = []
    for side in SIDES:
        a, b = old[side]["families"], new[side]["families"]
        changes += [Change(side, p, "removed") for p in a if p not in b]
        changes += [Change(side, p, "added") for p in b if p not in a]
        for pattern in (p for p in a if p in b):
            x, y = a[pattern], b[pattern]
            if x["shape"] != y["shape"]:
                changes.append(Change(side, pattern, "shape", tuple(x["shape"]), tuple(y["shape"])))
            if _ranges(x) != _ranges(y):
                changes.append(Change(side, pattern, "ranges", _ranges(x), _ranges(y)))
            elif x["count"] != y["count"]:
                changes.append(Change(side, pattern, "count", x["count"], y["count"]))
    return changes


def _ranges(entry: dict[str, Any]) -> str:
    return ", ".join(f"{p} {entry[p]}" for p in PLACEHOLDERS if p in entry)


def field_changes(old: Manifest, new: Manifest) -> list[tuple[str, Any, Any]]:
    """Differences outside the families: (dotted field, old value, new value)."""
    a, b = _fields(old), _fields(new)
    return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def _fields(manifest: Manifest, prefix: str = "") -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in manifest.items():
        if key == "families":
            continue
        if isinstance(value, dict):
            fields |= _fields(value, f"{prefix}{key}.")
        else:
            fields[f"{prefix}{key}"] = value
    return fields


DERIVED = ("hf.", "megatron.", "parameters.")  # fields that follow from the families


def verify(module_text: str, manifest_text: str, module: str) -> list[str]:
    """Problems between a bridge module's table (as written) and its manifest, naming each family."""
    try:
        table = json.loads(of_module(module_text, module))
    except Exception as e:  # noqa: BLE001 - a hand-edited module can fail in any way; report it
        return [f"cannot expand the mapping table: {type(e).__name__}: {e}"]
    try:
        recorded = parse(manifest_text, file_name(module))
    except CodegenError as e:
        return [str(e)]
    problems = [_problem(c) for c in family_changes(recorded, table)]
    for field, manifest_value, table_value in field_changes(recorded, table):
        if not (problems and field.startswith(DERIVED)):
            problems.append(f"manifest {field} is {manifest_value}, the table gives {table_value}")
    return problems


def _problem(change: Change) -> str:
    side, pattern = SIDES[change.side], change.pattern
    return {
        "removed": f"manifest family {pattern} ({side}) is not mapped",
        "added": f"{side} family {pattern} is mapped but not in the manifest",
        "shape": f"{side} family {pattern} is re-shaped: {change.old} in the manifest, {change.new} in the table",
        "ranges": f"{side} family {pattern} covers {change.new} in the table, {change.old} in the manifest",
        "count": f"{side} family {pattern} has {change.new} tensors in the table, {change.old} in the manifest",
    }[change.what]
