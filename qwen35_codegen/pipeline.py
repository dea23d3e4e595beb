"""The pipeline: read -> infer -> render, and the drift check of committed bridges.

Everything is computed in memory first and written only once nothing can fail any more, so a bad
input leaves no file behind.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from qwen35_bridge.targets import DEFAULT_TARGET, require_target
from qwen35_codegen import checkout, sources
from qwen35_codegen.errors import CodegenError
from qwen35_codegen.registry import index as bridge_index
from qwen35_codegen.rendering.bridge_module import (
    Origin,
    module_name,
    render_bridge,
    write_atomic,
)
from qwen35_codegen.review import manifest
from qwen35_codegen.spec import LayoutChoices, ModelSpec, infer_spec


@dataclass(frozen=True)
class Request:
    """What the user asked to generate."""

    ref: str
    index: Path | None = None
    choices: LayoutChoices = LayoutChoices()
    name: str | None = None
    target: str = DEFAULT_TARGET  # the megatron-core model class (qwen35_bridge.targets)


@dataclass(frozen=True)
class Generated:
    """A rendered bridge, its key manifest and its summary, not yet written."""

    source: sources.Source
    spec: ModelSpec
    module: str
    text: str
    manifest: str
    entry: bridge_index.Entry
    summary: str = ""

    def files(self) -> dict[str, str]:
        """File name -> text of everything generated for this bridge."""
        return {
            f"{self.module}.py": self.text,
            manifest.file_name(self.module): self.manifest,
            summary_file_name(self.module): self.summary,
        }


def summary_file_name(module: str) -> str:
    return f"{module}.md"


def infer(request: Request) -> tuple[sources.Source, ModelSpec]:
    source = sources.resolve(request.ref, index=request.index, repo_root=checkout.REPO_ROOT)
    spec = infer_spec(
        source.config,
        weight_map=source.weight_map,
        statements=source.statements,
        choices=request.choices,
    )
    return source, spec


def options_of(request: Request) -> dict[str, str]:
    """The command-line options that must be repeated to regenerate the same bridge."""
    options = {}
    if request.index is not None:
        options["index"] = sources.recorded_path(request.index, checkout.REPO_ROOT)
    for key in ("experts", "mtp_experts", "hf_prefix"):
        value = getattr(request.choices, key)
        if value is not None:
            options[key] = value
    if request.name is not None:
        options["name"] = request.name
    if request.target != DEFAULT_TARGET:
        options["target"] = request.target
    return options


def default_module(model_id: str, target: str) -> str:
    """The module name of a model's bridge: from its id, with the target after it unless `gpt`."""
    name = module_name(model_id)
    return name if target == DEFAULT_TARGET else f"{name}_{target}"


def command_of(ref: str, options: dict[str, str]) -> str:
    parts = ["codegen", "generate", ref]
    for key, value in sorted(options.items()):
        parts += [f"--{key.replace('_', '-')}", value]
    return shlex.join(parts)


def generate(request: Request) -> Generated:
    """Render the bridge for `request` (nothing is written)."""
    try:
        require_target(request.target)
    except ValueError as e:
        raise CodegenError(f"--target: {e}") from None
    source, spec = infer(request)
    if spec.needs_mtp_experts_choice:
        raise CodegenError(
            f"{source.model_id}: how the MTP layer's experts are stored is unknown (no index, no catalog "
            "statement); pass --mtp-experts packed|per_expert"
        )
    options = options_of(request)
    command = command_of(source.ref, options)
    module = request.name or default_module(source.model_id, request.target)
    origin = Origin(
        source.ref, source.provenance, source.config_sha256, source.index_sha256, command
    )
    text = render_bridge(spec, source.model_id, origin, request.target)
    entry = bridge_index.Entry(
        model_id=source.model_id,
        module=module,
        source=source.ref,
        options=options,
        spec_sha256=spec.fingerprint(),
    )
    from qwen35_codegen.review import summary  # it describes a Generated: imported here

    manifest_text = manifest.of_module(text, module)
    generated = Generated(
        source=source, spec=spec, module=module, text=text, manifest=manifest_text, entry=entry
    )
    return replace(generated, summary=summary.render(generated))


def write(generated: Generated, out: Path) -> list[Path]:
    """Write the module, its manifest and its summary into `out`; in the committed folder, also
    update the index."""
    files = {out / name: text for name, text in generated.files().items()}
    if out.resolve() == checkout.GENERATED.resolve():
        entries = bridge_index.read(checkout.GENERATED)
        new = generated.entry
        clash = [
            e
            for e in entries.values()
            if e.module == new.module and (e.model_id, e.target) != (new.model_id, new.target)
        ]
        if clash:
            raise CodegenError(
                f"module {new.module} already holds {clash[0].model_id} "
                f"(target {clash[0].target}); pass --name"
            )
        entries = {
            module: e
            for module, e in entries.items()
            if (e.model_id, e.target) != (new.model_id, new.target)
        }
        entries[new.module] = new
        files.update(
            {checkout.GENERATED / name: text for name, text in bridge_index.render(entries).items()}
        )
    for path, text in files.items():
        write_atomic(path, text)
    return list(files)


@dataclass(frozen=True)
class Drift:
    """One problem `check` found, and the command that fixes it."""

    path: str
    problem: str
    fix: str


def check(folder: Path | None = None) -> list[Drift]:
    """Regenerate every committed bridge and its manifest from the recorded source and compare, byte
    for byte; and hold each committed table, as it is on disk, against its committed manifest."""
    folder = folder or checkout.GENERATED
    drifts: list[Drift] = []
    entries = bridge_index.read(folder)
    expected: dict[str, str] = {}
    for entry in entries.values():
        command = command_of(entry.source, entry.options)
        if not committable(entry.source):
            drifts.append(
                Drift(
                    entry.model_id,
                    f"source {entry.source} is neither a catalog id nor a file in the repository",
                    "regenerate from `catalog:ID` or a config inside the repository",
                )
            )
            continue
        try:
            generated = generate(request_of(entry))
        except CodegenError as e:
            drifts.append(Drift(f"{entry.module}.py", f"cannot regenerate: {e}", command))
            continue
        expected.update(generated.files())
    expected.update(bridge_index.render(entries))
    for name, text in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            drifts.append(Drift(f"qwen35_bridge/generated/{name}", "missing", _fix(name, entries)))
        elif path.read_text(encoding="utf-8") != text:
            drifts.append(
                Drift(
                    f"qwen35_bridge/generated/{name}",
                    "differs from what the generator produces",
                    _fix(name, entries),
                )
            )
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in expected and not path.name.startswith("."):
            drifts.append(
                Drift(
                    f"qwen35_bridge/generated/{path.name}",
                    "not produced by any index entry",
                    f"git rm qwen35_bridge/generated/{path.name}",
                )
            )
    for entry in entries.values():
        module, manifest_file = folder / f"{entry.module}.py", folder / manifest.file_name(
            entry.module
        )
        if module.is_file() and manifest_file.is_file():
            problems = manifest.verify(
                module.read_text(encoding="utf-8"),
                manifest_file.read_text(encoding="utf-8"),
                entry.module,
            )
            drifts += [
                Drift(
                    f"qwen35_bridge/generated/{module.name}",
                    problem,
                    command_of(entry.source, entry.options),
                )
                for problem in problems
            ]
    return drifts


def _fix(name: str, entries: dict[str, bridge_index.Entry]) -> str:
    for entry in entries.values():
        if name in (
            f"{entry.module}.py",
            manifest.file_name(entry.module),
            summary_file_name(entry.module),
        ):
            return command_of(entry.source, entry.options)
    return "regenerate any bridge (`codegen generate catalog:ID`) to rewrite the index"


def request_of(entry: bridge_index.Entry) -> Request:
    return _request(entry.source, entry.options)


def request_of_command(command: str) -> Request:
    """Inverse of `command_of`: the request a bridge's `# Regenerate:` banner line records."""
    words = shlex.split(command)
    if words[:2] != ["codegen", "generate"] or len(words) % 2 == 0:
        raise CodegenError(f"not a command that `codegen generate` records: {command!r}")
    options = {
        flag.removeprefix("--").replace("-", "_"): value
        for flag, value in zip(words[3::2], words[4::2])
    }
    return _request(words[2], options)


def _request(ref: str, opts: dict[str, str]) -> Request:
    return Request(
        ref=ref,
        index=checkout.REPO_ROOT / opts["index"] if "index" in opts else None,
        choices=LayoutChoices(
            experts=opts.get("experts"),
            mtp_experts=opts.get("mtp_experts"),
            hf_prefix=opts.get("hf_prefix"),
        ),
        name=opts.get("name"),
        target=opts.get("target", DEFAULT_TARGET),
    )


def committable(ref: str) -> bool:
    """Whether `codegen check` can regenerate from this source: the catalog or a repository file."""
    if ref.startswith(sources.CATALOG_SCHEME):
        return True
    path = Path(ref)
    return not path.is_absolute() and (checkout.REPO_ROOT / path).exists()
