"""Where the committed bridges live, and whether the generator runs from a project checkout.

The committed bridges are package data of the runtime (`qwen35_bridge/generated`), so training
code imports them without the generator. Paths recorded in a bridge (`--index tests/...`) are
relative to the checkout; an installed generator has no checkout and writes only where told.
"""

from __future__ import annotations

from pathlib import Path

import qwen35_bridge.generated

GENERATED = Path(qwen35_bridge.generated.__file__).resolve().parent
REPO_ROOT = GENERATED.parent.parent


def is_checkout() -> bool:
    """Whether `REPO_ROOT` is this project's source tree (not an install's site-packages)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "qwen35_codegen").is_dir()
