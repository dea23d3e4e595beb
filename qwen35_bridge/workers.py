"""The processes one on-disk conversion is spread over (torchrun ranks, on one node or many).

Every worker plans the whole conversion from the source's metadata, so all agree on it without
sending it; each converts its share of the groups (balanced by bytes) and writes its own files
into one staging folder on a shared filesystem; the first worker writes what needs everyone's
results (an index, torch_dist's metadata) and puts the folder in place. Steps end with every
worker's outcome exchanged (`step`): when one fails, all stop with its message, and nothing is
left behind. With one worker every exchange is a no-op, so the code is the same.
"""

from __future__ import annotations

import datetime
import heapq
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen35_bridge.errors import BridgeError, ConversionError

#: How long a worker waits for the others at an exchange: one of them converting a large share
#: of a large model (a conversion's steps end in an exchange) can take this long.
EXCHANGE_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Workers:
    """This worker's rank among `size` workers (a torch.distributed gloo group when several)."""

    rank: int = 0
    size: int = 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every worker's `value`, in rank order, on every worker."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """The first worker's `value`, on every worker."""
        return self.gather(value if self.first else None)[0]

    @contextmanager
    def step(self) -> Iterator[None]:
        """A step every worker takes: its failure (or any peer's) raises on every worker once all
        have reached the end of the step, so no worker waits for one that gave up."""
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - carried to the exchange, then raised
            error = e
        if self.size == 1:
            if error is not None:
                raise error
            return
        outcomes = self.gather(None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
        if failed:
            rank, message = failed[0]
            raise ConversionError(f"worker {rank} of {self.size} failed: {message}")

    def share(self, sizes: Sequence[int]) -> list[int]:
        """This worker's items of `sizes` (bytes per item), in order (see `shares`)."""
        return shares(sizes, self.size)[self.rank]


def shares(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Each worker's items of `sizes` (bytes per item), in their order. The items are dealt
    largest first, each to the worker with the fewest bytes so far (ties to the lower rank), so
    no share exceeds another by more than the last item it was dealt: a small one wherever small
    items remain after the large ones. Runs cut from the items in order were uneven by up to half
    the largest item: two workers of an MoE checkpoint with five 436 MB expert groups got 47% and
    53% of its bytes."""
    loads = [(0, rank) for rank in range(workers)]
    owned: list[list[int]] = [[] for _ in range(workers)]
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owned[rank].append(item)
        heapq.heappush(loads, (load + sizes[item], rank))
    return [sorted(items) for items in owned]


def _describe(error: BaseException) -> str:
    if isinstance(error, BridgeError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, SystemExit):
        return "terminated"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return f"{type(error).__name__}: {error}"


SINGLE = Workers()


@contextmanager
def from_environment() -> Iterator[Workers]:
    """The workers torchrun started this process among (`RANK`, `WORLD_SIZE`, and its rendezvous
    in `MASTER_ADDR`/`MASTER_PORT`), joined in a gloo group for the block (and left after it); one
    worker without torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield SINGLE
        return
    import torch.distributed as dist

    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo", timeout=EXCHANGE_TIMEOUT)
    try:
        yield Workers(dist.get_rank(), dist.get_world_size())
    finally:
        if joined and dist.is_initialized():
            # gloo frees a finished exchange's tensors on its own thread, which needs the
            # interpreter: a barrier makes it finish with the last exchange before the group goes
            # (else a worker can abort at exit, "terminate called without an active exception").
            try:  # a worker that died is waited for a minute, not for the exchange timeout
                dist.monitored_barrier(timeout=datetime.timedelta(minutes=1))
            finally:
                dist.destroy_process_group()


@contextmanager
def staged_directory(
    destination: Path, workers: Workers, *, force: bool = False, source: Path | None = None
) -> Iterator[Path]:
    """`formats.staging.staged_directory` for several workers: the first creates the staging
    folder (after the same checks) and every worker writes into it; it is put in place when the
    block succeeds on every worker, and removed when it fails on any."""
    from qwen35_bridge.formats import staging

    if workers.size == 1:
        with staging.staged_directory(destination, force=force, source=source) as folder:
            yield folder
        return
    context = staging.staged_directory(destination, force=force, source=source)
    folder = None
    with workers.step():
        if workers.first:
            folder = context.__enter__()
    folder = Path(workers.broadcast(str(folder) if folder is not None else None))
    error: BaseException | None = None
    try:
        with workers.step():
            yield folder
    except BaseException as e:  # noqa: BLE001 - every worker has the failure now
        error = e
    if workers.first:
        if error is None:
            context.__exit__(None, None, None)
        else:
            context.__exit__(type(error), error, error.__traceback__)
    if error is not None:
        raise error
    workers.gather(None)  # the folder is in place before any worker returns
