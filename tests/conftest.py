"""Shared pytest fixtures, and the `slow` mark on every CPU end-to-end proof (`tests/e2e`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import qwen35_codegen.catalog

CONFIG_DIR = Path(qwen35_codegen.catalog.__file__).resolve().parent
E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def config_dir() -> Path:
    """The real configs bundled with the catalog (provenance in qwen35_codegen/catalog/catalog.json)."""
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
