"""Find the bridge for a spec: a committed one whose recorded spec fingerprint matches, or one
generated on the spot into a cache folder (never into generated/, which holds reviewed code)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from codegen import index as bridge_index
from codegen.generator import GENERATED
from codegen.render import Origin, build_digest, module_name, render_bridge, write_atomic
from codegen.runtime.bridge import BridgeBase
from codegen.spec import ModelSpec


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen35-bridge-codegen" / "bridges"


def find_committed(spec: ModelSpec) -> str | None:
    """The module name of a committed bridge with exactly this spec, if any."""
    fingerprint = spec.fingerprint()
    for entry in bridge_index.read(GENERATED).values():
        if entry.spec_sha256 == fingerprint:
            return entry.module
    return None


def bridge_for(
    spec: ModelSpec, model_id: str, origin: Origin, *, bridge_dir: Path | None = None
) -> tuple[BridgeBase, str]:
    """A bridge instance for `spec`, and where its module is (for the user to read). A bridge
    generated earlier by this same build for this spec is reused without rendering it again."""
    committed = find_committed(spec)
    if committed is not None:
        module = importlib.import_module(f"generated.{committed}")
        return module.Bridge(), f"generated/{committed}.py (committed)"
    folder = bridge_dir or cache_root()
    path = folder / f"{module_name(model_id)}_{spec.fingerprint()[:12]}_{build_digest()[:8]}.py"
    if not path.is_file():
        write_atomic(path, render_bridge(spec, model_id, origin))
    return _load_file(path).Bridge(), f"{path} (generated for this conversion)"


def _load_file(path: Path) -> ModuleType:
    name = f"_codegen_bridge_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
