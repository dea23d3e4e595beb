"""Shared pytest fixtures."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CONFIG_DIR = Path(__file__).resolve().parent.parent / "codegen" / "catalog"


@pytest.fixture(scope="session")
def config_dir() -> Path:
    """The real configs bundled with the catalog (provenance in codegen/catalog/catalog.json)."""
    return CONFIG_DIR


@pytest.fixture(scope="session")
def load_config(config_dir: Path) -> Callable[[str], dict[str, Any]]:
    """Load a real config by file name, e.g. `load_config("Qwen__Qwen3.6-27B.json")`."""

    def load(name: str) -> dict[str, Any]:
        return json.loads((config_dir / name).read_text())

    return load


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> None:
    """Caches (generated bridges, torch_dist layouts) of this test session only, so tests start
    cold and never read or leave the user's cache."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
