"""File names of the checkpoint formats, and the cache folder, defined once."""

from __future__ import annotations

import os
from pathlib import Path

#: An HF checkpoint folder.
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
#: The tokenizer's and the processor's files of an HF release, carried through a conversion.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)

CACHE_FOLDER_NAME = "qwen35-bridge-codegen"


def cache_root() -> Path:
    """Where bridges generated for a conversion and torch_dist layouts are cached
    (`$XDG_CACHE_HOME/qwen35-bridge-codegen`, by default under `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / CACHE_FOLDER_NAME
