"""A generated bridge as of a git revision, for `codegen diff main:qwen35_bridge/generated/x.py qwen35_bridge/generated/x.py`.

A bridge module records its source, not its spec, and a pull request that edits a config changes
what that source gives. So the spec of the old side is inferred by the revision's own generator
from the revision's own sources (catalog, recorded config files), in a child process run on an
exported copy of the revision's tree; the comparison then shows exactly the fields the edit changed.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35_codegen.errors import CodegenError

_REVISION_PATH = re.compile(r"^(?P<rev>[^:\s]+):(?P<path>[^:]+\.py)$")

# Run on the revision's tree: prints the spec its generator infers for a command. `{module}` is
# the revision's pipeline module (the generator moved from `codegen.generator` in 0.2).
_INFER = """
import json, sys
from {module} import infer, request_of_command
source, spec = infer(request_of_command(sys.argv[1]))
print(json.dumps({{"spec": spec.to_dict(), "provenance": source.provenance}}))
"""
_PIPELINE_MODULES = {
    "qwen35_codegen/pipeline.py": "qwen35_codegen.pipeline",
    "codegen/generator.py": "codegen.generator",
}


@dataclass(frozen=True)
class AtRevision:
    """A module's text at a revision, and the spec and provenance that revision gives its source
    (None when that revision's generator cannot say, e.g. one older than this interface)."""

    label: str
    text: str
    spec: dict[str, Any] | None
    provenance: str | None


def split(arg: str) -> tuple[str, str] | None:
    """(revision, path) for `REV:PATH.py`, where no such file exists as written."""
    match = _REVISION_PATH.match(arg)
    if match is None or Path(arg).exists():
        return None
    return match["rev"], match["path"]


def read(rev: str, path: str, repo: Path, command_of: Any) -> AtRevision:
    """The module at `rev:path` of `repo`; `command_of(text)` gives its `# Regenerate:` command."""
    text = _git(repo, "show", f"{rev}:{path}").decode("utf-8")
    command = command_of(text)
    with tempfile.TemporaryDirectory(prefix="codegen-rev-") as tree:
        archive = _git(repo, "archive", "--format=tar", rev)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        module = next((m for f, m in _PIPELINE_MODULES.items() if (Path(tree) / f).is_file()), None)
        if module is None:
            return AtRevision(f"{rev}:{path}", text, None, None)
        child = subprocess.run(
            [sys.executable, "-c", _INFER.format(module=module), command],
            cwd=tree,
            env=dict(os.environ, PYTHONPATH=tree, HF_HUB_OFFLINE="1"),
            capture_output=True,
            text=True,
        )
    if child.returncode != 0:
        return AtRevision(f"{rev}:{path}", text, None, None)
    inferred = json.loads(child.stdout)
    return AtRevision(f"{rev}:{path}", text, inferred["spec"], inferred["provenance"])


def _git(repo: Path, *args: str) -> bytes:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CodegenError(f"git {' '.join(args)}: {message[-1] if message else 'failed'}")
    return result.stdout
