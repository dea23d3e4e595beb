"""`codegen diff OLD NEW`: what a regeneration changes, for review. First the spec (source, fields,
layer kinds, layouts), then the key manifest (families added, removed, re-shaped, re-ranged), then
the generated code itself. Each side is a model reference (generated in memory), a bridge module
file, whose table is read as written and whose spec is inferred again from its recorded source, or
`REV:PATH`, a module as of a git revision, whose spec that revision infers from its own sources."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35_codegen import checkout, pipeline
from qwen35_codegen.errors import CodegenError
from qwen35_codegen.review import manifest, revision
from qwen35_codegen.review.key_families import PLACEHOLDERS
from qwen35_codegen.review.manifest import Manifest
from qwen35_codegen.review.spec_changes import spec_changes
from qwen35_codegen.spec.model_spec import ModelSpec

BANNER_FIELDS = {
    "source": "# Source: ",
    "config sha256": "# config sha256: ",
    "index sha256": "# index sha256: ",
}
REGENERATE = "# Regenerate: "


@dataclass(frozen=True)
class Side:
    """One bridge under comparison."""

    label: str
    text: str
    manifest: Manifest
    spec: ModelSpec
    provenance: str
    spec_sha256: str  # the fingerprint the module records (a file may predate its source's spec)


def load(arg: str) -> Side:
    """A bridge module file (`*.py`) as it is, a module as of a git revision (`REV:PATH.py`), or
    the bridge generated in memory for a reference."""
    at_revision = revision.split(arg)
    if at_revision is not None:
        return _at_revision(*at_revision)
    path = Path(arg)
    if path.suffix == ".py" and path.is_file():
        return _module(arg, path.read_text(encoding="utf-8"), path.stem)
    generated = pipeline.generate(pipeline.Request(ref=arg))
    table = manifest.parse(generated.manifest, generated.module)
    return Side(
        f"qwen35_bridge/generated/{generated.module}.py",
        generated.text,
        table,
        generated.spec,
        generated.source.provenance,
        generated.spec.fingerprint(),
    )


def _module(label: str, text: str, stem: str) -> Side:
    source, spec = pipeline.infer(pipeline.request_of_command(_regenerate(text, label)))
    table = manifest.parse(manifest.of_module(text, stem), label)
    return Side(label, text, table, spec, source.provenance, table["spec_sha256"])


def _at_revision(rev: str, path: str) -> Side:
    """The module as committed at `rev`, with the spec `rev` itself infers for it, where it can."""
    old = revision.read(rev, path, checkout.REPO_ROOT, lambda text: _regenerate(text, path))
    if old.spec is None or old.provenance is None:
        # today's source then stands in, and the spec lines say it no longer gives its spec
        return _module(old.label, old.text, Path(path).stem)
    try:
        spec = ModelSpec.from_dict(old.spec)
    except (KeyError, TypeError) as e:  # a revision with another spec schema
        raise CodegenError(
            f"{old.label}: its revision describes the spec differently ({e})"
        ) from None
    table = manifest.parse(manifest.of_module(old.text, Path(path).stem), old.label)
    return Side(old.label, old.text, table, spec, old.provenance, table["spec_sha256"])


def _regenerate(text: str, label: str) -> str:
    command = _banner(text).get("regenerate")
    if command is None:
        raise CodegenError(f"{label}: no `{REGENERATE.strip()}` line; is it a generated bridge?")
    return command


def _banner(text: str) -> dict[str, str]:
    """The record a generated module opens with: its source, config and index hashes, the command."""
    fields = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        for key, head in [*BANNER_FIELDS.items(), ("regenerate", REGENERATE)]:
            if line.startswith(head):
                fields[key] = line.removeprefix(head)
    return fields


def render(old: Side, new: Side) -> str:
    """The whole review diff as Markdown."""
    sections = [
        "## Spec",
        *_bullets(_spec_lines(old, new)),
        "",
        "## Key manifest",
        *_bullets(_manifest_lines(old.manifest, new.manifest)),
        "",
        "## Generated code",
        *_code_diff(old, new),
    ]
    return "\n".join(sections) + "\n"


def _bullets(lines: Iterable[str]) -> list[str]:
    """Top-level lines become bullets; indented ones stay under the bullet before them."""
    return [line if line.startswith("  ") else f"- {line}" for line in lines]


def _spec_lines(old: Side, new: Side) -> Iterator[str]:
    a, b = _banner(old.text), _banner(new.text)
    for key in BANNER_FIELDS:
        if a.get(key) != b.get(key):
            yield f"{key}: {a.get(key)} -> {b.get(key)}"
    if old.provenance != new.provenance:
        yield f"provenance: {old.provenance} -> {new.provenance}"
    if old.manifest["model_id"] != new.manifest["model_id"]:
        yield f"model id: {old.manifest['model_id']} -> {new.manifest['model_id']}"
    stale = [side for side in (old, new) if side.spec.fingerprint() != side.spec_sha256]
    for side in stale:
        yield (
            f"warning: {side.label} records spec sha256 {side.spec_sha256[:12]}, but its source now "
            f"gives {side.spec.fingerprint()[:12]}, so the lines below compare what the sources give "
            "today, not what it was generated from; name it as REV:PATH (e.g. main:qwen35_bridge/generated/x.py) "
            "to read its source as of that revision"
        )
    changes = spec_changes(old.spec, new.spec)
    if not changes:
        today = " as the sources give them today" if stale else ""
        yield f"architecture and layouts: identical{today} (spec sha256 {new.spec.fingerprint()[:12]})"
        return
    yield from changes.fields
    yield from changes.layers
    yield from (f"layout {line}" for line in changes.layouts)


def _manifest_lines(old: Manifest, new: Manifest) -> Iterator[str]:
    changes = manifest.family_changes(old, new)
    for side, name in manifest.SIDES.items():
        a, b = old[side], new[side]
        mine = [c for c in changes if c.side == side]
        same_keys = a["key_set_sha256"] == b["key_set_sha256"]
        counts = f"{a['keys']:,} -> {b['keys']:,} tensors, {len(a['families'])} -> {len(b['families'])} families"
        if not mine and same_keys:
            yield f"{name}: identical ({b['keys']:,} tensors in {len(b['families'])} families, key set sha256 {b['key_set_sha256'][:12]})"
            continue
        yield f"{name}: {counts}; key set sha256 {'unchanged' if same_keys else 'changed'}"
        yield from _family_lines(mine, old[side]["families"], new[side]["families"])
    parameters = [
        (f.removeprefix("parameters."), x, y)
        for f, x, y in manifest.field_changes(old, new)
        if f.startswith("parameters.")
    ]
    if parameters:
        yield "parameters:"
        yield from (f"  {component}: {x:,} -> {y:,}" for component, x, y in parameters)


def _family_lines(
    changes: list[manifest.Change], old: dict[str, Any], new: dict[str, Any]
) -> Iterator[str]:
    """Added and removed families in full, index range changes grouped, then each re-shaped family."""
    of = {
        what: [c for c in changes if c.what == what]
        for what in ("added", "removed", "ranges", "count", "shape")
    }
    yield from (f"  added {c.pattern} ({_entry(new[c.pattern])})" for c in of["added"])
    yield from (f"  removed {c.pattern} ({_entry(old[c.pattern])})" for c in of["removed"])
    ranged: dict[tuple[str, str], list[str]] = {}
    for change in of["ranges"]:
        ranged.setdefault((change.old, change.new), []).append(change.pattern)
    for (x, y), patterns in ranged.items():
        which = f": {', '.join(patterns)}" if len(patterns) <= 2 else ""
        yield f"  index ranges {x} -> {y} in {len(patterns)} famil{'ies' if len(patterns) > 1 else 'y'}{which}"
    yield from (f"  count {c.pattern}: {c.old} -> {c.new}" for c in of["count"])
    yield from (f"  re-shaped {c.pattern}: {c.old} -> {c.new}" for c in of["shape"])


def _entry(entry: dict[str, Any]) -> str:
    ranges = ", ".join(f"{p} {entry[p]}" for p in PLACEHOLDERS if p in entry)
    return (
        f"{ranges + ', ' if ranges else ''}{entry['count']} tensors, shape {tuple(entry['shape'])}"
    )


def _code_diff(old: Side, new: Side) -> list[str]:
    a, b = (f"{prefix}/{side.label.lstrip('/')}" for prefix, side in (("a", old), ("b", new)))
    lines = difflib.unified_diff(
        old.text.splitlines(keepends=True), new.text.splitlines(keepends=True), a, b
    )
    text = "".join(lines)
    return ["```diff", text.rstrip("\n"), "```"] if text else ["identical"]
