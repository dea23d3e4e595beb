"""The two packages depend one way: the runtime (`qwen35_bridge`) never imports the generator
(`qwen35_codegen`) or the test support, so training code that imports a bridge carries neither."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import qwen35_bridge
import qwen35_codegen

RUNTIME = Path(qwen35_bridge.__file__).resolve().parent
GENERATOR = Path(qwen35_codegen.__file__).resolve().parent
FORBIDDEN_IN_RUNTIME = ("qwen35_codegen", "tests")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_runtime_module_imports_the_generator_or_the_tests() -> None:
    offenders = {
        str(path.relative_to(RUNTIME.parent)): sorted(bad)
        for path in sorted(RUNTIME.rglob("*.py"))
        if (bad := {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN_IN_RUNTIME})
    }
    assert offenders == {}


def test_the_scan_sees_function_level_imports(tmp_path: Path) -> None:
    """The scan above must catch an import hidden in a function body, or it proves nothing."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from qwen35_codegen.pipeline import check\n")
    assert "qwen35_codegen.pipeline" in imported_modules(module)


def test_importing_every_runtime_module_loads_no_generator_module() -> None:
    """Import every runtime module, committed bridges included, in a fresh interpreter."""
    program = """
import importlib, json, pkgutil, sys
import qwen35_bridge
for info in pkgutil.walk_packages(qwen35_bridge.__path__, "qwen35_bridge."):
    importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("qwen35_codegen", "tests"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=RUNTIME.parent
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_importing_a_committed_bridge_imports_no_torch() -> None:
    """A bridge module is a table: reading it (for review tools or an inference engine's
    loader) must not pay for torch, megatron-core or transformers."""
    program = """
import json, sys
from qwen35_bridge.generated import load_bridge
bridge = load_bridge("Qwen/Qwen3.5-35B-A3B")()
assert bridge.hf_shapes and bridge.megatron_shapes and bridge.groups
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron", "transformers"})))
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=RUNTIME.parent
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


# Stems that several modules share because they do the same job in different places: each
# format's implementation of the reader/writer protocol, and each package's own error types.
SHARED_STEMS = {"reader", "writer", "error"}


def test_no_two_modules_share_a_name_stem_across_the_packages() -> None:
    """`convert.py` beside `conversion.py`, `bridge.py` beside `bridges.py`: names that collide
    hide which module does what. Package `__init__`/`__main__` files are exempt."""
    stems: dict[str, list[str]] = {}
    for root in (RUNTIME, GENERATOR):
        for path in root.rglob("*.py"):
            if path.stem.startswith("__") or "generated" in path.parts:
                continue
            stems.setdefault(path.stem.rstrip("s"), []).append(str(path.relative_to(root.parent)))
    clashes = {
        stem: sorted(paths)
        for stem, paths in stems.items()
        if len(paths) > 1 and stem not in SHARED_STEMS
    }
    assert clashes == {}


def test_every_reader_and_writer_implements_the_format_protocol() -> None:
    """Conversion treats formats alike only if each one really has the protocol's methods."""
    from qwen35_bridge.formats.fp8 import DequantizingReader
    from qwen35_bridge.formats.protocol import TensorReader, TensorWriter
    from qwen35_bridge.formats.safetensors.reader import CheckpointReader
    from qwen35_bridge.formats.safetensors.writer import StreamingWriter
    from qwen35_bridge.formats.torch_dist import Reader as TorchDistReader

    def methods(protocol: type) -> set[str]:
        return {n for n in vars(protocol) if not n.startswith("_") and callable(vars(protocol)[n])}

    for reader in (CheckpointReader, DequantizingReader, TorchDistReader):
        assert methods(TensorReader) <= set(dir(reader)), reader
    assert methods(TensorWriter) <= set(dir(StreamingWriter))
