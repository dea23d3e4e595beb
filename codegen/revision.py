"""A generated bridge as of a git revision, for `codegen diff main:generated/x.py generated/x.py`.

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

from codegen.errors import CodegenError

_REVISION_PATH = re.compile(r"^(?P<rev>[^:\s]+):(?P<path>[^:]+\.py)$")

# Run by the revision's interpreter path: prints the spec its generator infers for a command.
_INFER = """
import json, sys
from codegen import generator
source, spec = generator.infer(generator.request_of_command(sys.argv[1]))
print(json.dumps({"spec": spec.to_dict(), "provenance": source.provenance}))
"""


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
        child = subprocess.run(
            [sys.executable, "-c", _INFER, command],
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
