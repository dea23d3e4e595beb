"""Megatron-LM's checkpoint tree, as its trainer writes it, read back to one iteration folder.

A run root holds `latest_checkpointed_iteration.txt` (an iteration number, or `release`) and one
folder per saved iteration, `iter_0000100/` or `release/`, each a torch_dist checkpoint (`.metadata`,
`__R_K.distcp`, `metadata.json`). Megatron-Bridge's runs have the same iteration folders; where the
tracker is missing, the newest `iter_*` folder is the one its loaders pick.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen35_bridge.errors import ConversionError

TRACKER_NAME = "latest_checkpointed_iteration.txt"
RELEASE = "release"
_ITERATION = re.compile(r"^iter_(\d{7,})$")


def iteration_folder(name: int | str) -> str:
    """`iter_0000100` for 100, `release` for the release checkpoint."""
    return RELEASE if name == RELEASE else f"iter_{int(name):07d}"


def is_torch_dist(folder: Path) -> bool:
    return (Path(folder) / ".metadata").is_file()


def resolve_iteration(path: Path, iteration: int | None = None) -> Path:
    """The torch_dist folder a path names: the folder itself, or in a run root the iteration
    `iteration`, else the tracker's, else the newest `iter_*` folder."""
    path = Path(path)
    if iteration is None and is_torch_dist(path):
        return path
    if iteration is not None:
        chosen = path / iteration_folder(iteration)
    elif (path / TRACKER_NAME).is_file():
        text = (path / TRACKER_NAME).read_text(encoding="utf-8").strip()
        if text != RELEASE and not text.isdigit():
            raise ConversionError(
                f"{path / TRACKER_NAME}: {text!r} is neither an iteration nor 'release'"
            )
        chosen = path / iteration_folder(text)
    else:
        found = (
            sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _ITERATION.match(p.name)))
            if path.is_dir()
            else []
        )
        if not found:
            raise ConversionError(
                f"{path}: neither a torch_dist checkpoint nor a Megatron run "
                f"({TRACKER_NAME} or iter_* folders)"
            )
        chosen = found[-1][1]
    if not is_torch_dist(chosen):
        raise ConversionError(f"{chosen}: no torch_dist checkpoint there (no .metadata)")
    return chosen
