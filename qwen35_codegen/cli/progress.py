"""A progress bar for conversions on a terminal: tensors and bytes done, rate, time left."""

from __future__ import annotations

import sys

from qwen35_bridge.offline import Progress


class TerminalProgress(Progress):
    """Rich's progress bar on stderr. Use `for_terminal()`: silent when not on a terminal."""

    def __init__(self, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._description = description
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
        )
        self._task = None
        self._done = 0

    def start(self, tensors: int, total_bytes: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(
            self._description, total=total_bytes, done=0, tensors=tensors
        )

    def advance(self, tensors: int, nbytes: int) -> None:
        self._done += tensors
        self._bar.update(self._task, advance=nbytes, done=self._done)

    def finish(self) -> None:
        self._bar.stop()


def for_terminal(description: str, *, quiet: bool = False) -> Progress:
    """A progress bar on a terminal; nothing with `quiet` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return Progress()
    return TerminalProgress(description)
