"""Resolve a model reference to its config.json (and weight map): never guess silently.

A reference is, in this order: `catalog:ID` (the bundled catalog only); an existing local directory
or config file; a hub id found through huggingface_hub (the hub when reachable, else the local HF
cache, honouring HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE); a hub id in the bundled catalog. A real
config from disk, the cache or the hub always wins over the catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwen35_bridge.errors import ConversionError
from qwen35_bridge.formats.modelopt import refuse_modelopt
from qwen35_bridge.formats.safetensors.header import read_header
from qwen35_bridge.paths import CONFIG_NAME, INDEX_NAME, SINGLE_FILE_NAME
from qwen35_codegen import catalog
from qwen35_codegen.errors import SourceError
from qwen35_codegen.spec.infer import Statement

CATALOG_SCHEME = "catalog:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["catalog", "path", "cache", "hub"]


@dataclass(frozen=True)
class Source:
    """A resolved reference: the raw config, its weight map, and where both came from."""

    kind: SourceKind
    model_id: str
    ref: str
    config: dict[str, Any]
    config_sha256: str
    provenance: str
    weight_map: dict[str, str] | None = None
    index_sha256: str | None = None
    directory: Path | None = None
    statements: dict[str, Statement] = field(default_factory=dict)


def resolve(ref: str, *, index: Path | None = None, repo_root: Path | None = None) -> Source:
    """Resolve `ref`; `index` overrides the weight map found next to the config."""
    if ref.startswith(CATALOG_SCHEME):
        return _from_catalog(ref[len(CATALOG_SCHEME) :], index)
    path = Path(ref).expanduser()
    if path.exists():
        return _from_path(path, index, repo_root)
    if not HUB_ID.match(ref):
        raise SourceError(f"{ref}: no such file or directory, and not a hub id (owner/name)")
    found = _from_hub(ref, index)
    if found is not None:
        return found
    if catalog.has(ref):
        return _from_catalog(ref, index)
    raise SourceError(
        f"{ref}: not a local path, not in the HF cache or reachable on the hub, and not in the catalog "
        "(see `codegen list`)"
    )


def _from_catalog(model_id: str, index: Path | None) -> Source:
    if not catalog.has(model_id):
        raise SourceError(f"{model_id}: not in the catalog (see `codegen list`)")
    entry = catalog.entry(model_id)
    weight_map, index_sha = _read_index(index) if index else (None, None)
    return Source(
        kind="catalog",
        model_id=model_id,
        ref=CATALOG_SCHEME + model_id,
        config=entry.config,
        config_sha256=sha256_of_config(entry.config),
        provenance=f"catalog, {entry.provenance}: {entry.source}",
        weight_map=weight_map,
        index_sha256=index_sha,
        statements=entry.statements,
    )


def _from_path(path: Path, index: Path | None, repo_root: Path | None) -> Source:
    config_path = path / CONFIG_NAME if path.is_dir() else path
    if not config_path.is_file():
        raise SourceError(f"{path}: no {CONFIG_NAME} in this directory")
    directory = config_path.parent
    config, config_sha = _read_config(config_path)
    refuse_modelopt(directory, config)
    weight_map, index_sha = _read_index(index) if index else _index_beside(directory)
    return Source(
        kind="path",
        model_id=directory.resolve().name,
        ref=recorded_path(config_path if not path.is_dir() else path, repo_root),
        config=config,
        config_sha256=config_sha,
        provenance=f"local file {config_path}",
        weight_map=weight_map,
        index_sha256=index_sha,
        directory=directory,
    )


def _from_hub(repo_id: str, index: Path | None) -> Source | None:
    """The config through huggingface_hub: from the hub when it answers, else from the local cache."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    reachable = False
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
        "1",
        "ON",
        "YES",
        "TRUE",
    }
    if not offline:
        try:
            huggingface_hub.get_hf_file_metadata(
                huggingface_hub.hf_hub_url(repo_id, CONFIG_NAME), timeout=5
            )
            reachable = True
        except HfHubHTTPError:
            return None  # the hub answered: no such repository or file there
        except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout)
            pass  # unreachable: fall back to the cache, as huggingface_hub itself does

    def download(filename: str) -> Path | None:
        try:
            return Path(
                huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=not reachable)
            )
        except (LocalEntryNotFoundError, HfHubHTTPError):
            return None

    config_file = download(CONFIG_NAME)
    if config_file is None:
        return None
    config, config_sha = _read_config(config_file)
    index_file = index or download(INDEX_NAME)
    weight_map, index_sha = _read_index(index_file) if index_file else (None, None)
    return Source(
        kind="hub" if reachable else "cache",
        model_id=repo_id,
        ref=repo_id,
        config=config,
        config_sha256=config_sha,
        provenance="the Hugging Face hub" if reachable else "the local HF cache",
        weight_map=weight_map,
        index_sha256=index_sha,
        directory=config_file.parent,
    )


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    data = path.read_bytes()
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config, sha256_of_config(config)


def sha256_of_config(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON, so re-flowed copies of one config agree."""
    return hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _index_beside(directory: Path) -> tuple[dict[str, str] | None, str | None]:
    if (directory / INDEX_NAME).is_file():
        return _read_index(directory / INDEX_NAME)
    if (directory / SINGLE_FILE_NAME).is_file():
        try:
            names = sorted(read_header(directory / SINGLE_FILE_NAME))
        except ConversionError as e:
            raise SourceError(str(e)) from None
        weight_map = {name: SINGLE_FILE_NAME for name in names}
        return weight_map, hashlib.sha256(json.dumps(sorted(names)).encode()).hexdigest()
    return None, None


def _read_index(path: Path) -> tuple[dict[str, str], str]:
    if not path.is_file():
        raise SourceError(f"{path}: index file not found")
    data = path.read_bytes()
    try:
        weight_map = json.loads(data)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a safetensors index with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{path}: weight_map must map tensor names to shard file names")
    return weight_map, hashlib.sha256(data).hexdigest()


def recorded_path(path: Path, repo_root: Path | None) -> str:
    """The path as a banner records it: relative to the repository when inside it."""
    resolved = path.resolve()
    if repo_root is not None:
        try:
            return resolved.relative_to(repo_root.resolve()).as_posix()
        except ValueError:
            pass
    return str(resolved)
