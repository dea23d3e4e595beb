"""The `--workers` launcher's wait for its workers (qwen35_codegen.cli.launch._supervise).

The workers here are stand-ins for processes: the launcher asks them only whether they are alive
and for their exit codes and sentinels, and the question under test is what it waits on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen35_codegen.cli import launch


class _Worker:
    """A worker that exits after `alive_answers` questions about whether it is alive."""

    def __init__(self, sentinel: int, alive_answers: int, exitcode: int = 0) -> None:
        self.sentinel = sentinel
        self._answers_left = alive_answers
        self._exitcode = exitcode
        self.killed = False

    def is_alive(self) -> bool:
        self._answers_left -= 1
        return self._answers_left >= 0 and not self.killed

    @property
    def exitcode(self) -> int | None:
        return None if self._answers_left >= 0 and not self.killed else self._exitcode

    def kill(self) -> None:
        self.killed = True


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """What each wait of the launcher was for (the wait itself returns at once)."""
    calls: list[list[int]] = []

    def record(sentinels: list[int], timeout: float) -> list[int]:
        calls.append(list(sentinels))
        return []

    monkeypatch.setattr(launch, "wait", record)
    return calls


def test_workers_that_exit_together_are_not_waited_for(waits: list[list[int]]) -> None:
    # The second has exited already, and the first exits right after the launcher first asks, as
    # two workers that finish the same conversion together do: the launcher must not then wait
    # on no sentinel at all, which would sleep the wait's whole timeout.
    workers = [_Worker(sentinel=10, alive_answers=1), _Worker(sentinel=11, alive_answers=0)]
    launch._supervise(workers, Path("/nonexistent/out"), started=0.0)
    assert waits == [[10]]


def test_every_wait_is_for_a_worker_still_running(waits: list[list[int]]) -> None:
    workers = [_Worker(sentinel=10, alive_answers=2), _Worker(sentinel=11, alive_answers=4)]
    launch._supervise(workers, Path("/nonexistent/out"), started=0.0)
    assert waits == [[10, 11], [10, 11], [11], [11]]


def test_the_others_are_killed_once_a_failed_worker_has_had_its_grace(
    waits: list[list[int]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(launch, "GRACE_S", -1.0)  # the grace is over as soon as one fails
    staging = tmp_path / ".out.partial-1"
    staging.mkdir()
    failed = _Worker(sentinel=10, alive_answers=0, exitcode=3)
    stuck = _Worker(sentinel=11, alive_answers=10**6)
    launch._supervise([failed, stuck], tmp_path / "out", started=0.0)
    assert stuck.killed
    assert waits == [[11]]
    assert not staging.exists()
