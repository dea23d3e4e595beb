"""The bundled catalog of known public configs, each with its provenance.

Verbatim, re-serialised and partial configs are stored as files. A reconstructed entry is its base
entry's config with the published values applied; every field it takes from the base unchanged is
listed as assumed, computed here rather than typed by hand.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from qwen35_codegen.spec.infer import Statement

PROVENANCES = ("verbatim", "re-serialised", "partial", "reconstructed")


@dataclass(frozen=True)
class CatalogEntry:
    model_id: str
    provenance: str
    source: str
    config: dict[str, Any]
    statements: dict[str, Statement]
    base: str | None
    published: tuple[str, ...]

    def assumed_fields(self) -> tuple[str, ...]:
        """Dotted paths of the values a reconstructed entry takes unchanged from its base."""
        if self.base is None:
            return ()
        return tuple(p for p in _leaf_paths(self.config) if p not in self.published)


def _read_json(name: str) -> Any:
    return json.loads(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


@cache
def _raw_entries() -> dict[str, dict[str, Any]]:
    return _read_json("catalog.json")["entries"]


def model_ids() -> tuple[str, ...]:
    return tuple(_raw_entries())


def has(model_id: str) -> bool:
    return model_id in _raw_entries()


def entry(model_id: str) -> CatalogEntry:
    """The catalog entry for `model_id` (KeyError if unknown)."""
    raw = _raw_entries()[model_id]
    if raw["provenance"] not in PROVENANCES:
        raise ValueError(f"catalog entry {model_id}: unknown provenance {raw['provenance']!r}")
    published: dict[str, Any] = {}
    if "file" in raw:
        config = _read_json(raw["file"])
    else:
        config = copy.deepcopy(entry(raw["base"]).config)
        for path in raw.get("removed", []):
            _delete(config, path)
        for section, name in raw.get("published_file", {}).items():
            published.update({f"{section}.{k}": v for k, v in _read_json(name).items()})
        published.update(raw.get("published", {}))
        for path, value in published.items():
            _assign(config, path, value)
    statements = {k: Statement(**v) for k, v in raw.get("statements", {}).items()}
    return CatalogEntry(
        model_id=model_id,
        provenance=raw["provenance"],
        source=raw["source"],
        config=config,
        statements=statements,
        base=raw.get("base"),
        published=tuple(published),
    )


def _assign(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        config = config[key]
    config[leaf] = value


def _delete(config: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        config = config[key]
    del config[leaf]


def _leaf_paths(config: dict[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        if isinstance(value, dict) and value:
            paths.extend(_leaf_paths(value, f"{prefix}{key}."))
        else:
            paths.append(f"{prefix}{key}")
    return paths
