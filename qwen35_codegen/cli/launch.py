"""`codegen convert --workers N`: the same conversion in N processes on this machine, joined as
torchrun would join them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), each converting its share.

The workers agree on every failure among themselves (qwen35_bridge.workers); this launcher hosts
their rendezvous store, waits for them, and if one dies without a word (killed, out of memory),
stops the others and removes the staging folder their run left beside the destination.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from multiprocessing.context import BaseContext
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

from qwen35_codegen.cli.heap import settled_heap

#: How long the others may take to finish after one worker exits with an error before they are
#: stopped (they stop by themselves at their next exchange when the worker failed in a step).
GRACE_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_threaded() -> bool:
    """This process has no thread but its main one (Linux; elsewhere: assume it has)."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def run_workers(argv: Sequence[str], count: int, destination: Path) -> int:
    """Run `codegen` with `argv` in `count` worker processes; their exit status (the first
    worker's when it failed, else the first failure's)."""
    import multiprocessing

    # Where this process runs nothing else (the `codegen` command), workers are forked from it
    # with torch and the converter imported once: each would otherwise import them itself,
    # seconds of CPU each on the cores the workers share. A process with threads of its own (a
    # test session, a caller's program) spawns fresh workers instead: a fork copies no thread
    # and could inherit a lock one of them holds. The store is made after the fork.
    fork = _single_threaded()
    # The converter imported here, its objects frozen before the fork: the workers' collectors
    # then neither walk them again (0.1 s each) nor copy the pages that hold them.
    with settled_heap() if fork else nullcontext():
        context = multiprocessing.get_context("fork" if fork else "spawn")
        return _start_and_supervise(argv, count, Path(destination), context)


def _start_and_supervise(
    argv: Sequence[str], count: int, destination: Path, context: BaseContext
) -> int:
    from torch.distributed import TCPStore

    port = _free_port()
    started = time.time()
    store_up = context.Event()
    workers = [
        context.Process(
            target=_worker, args=(list(argv), rank, count, port, store_up), daemon=False
        )
        for rank in range(count)
    ]
    for worker in workers:
        worker.start()
    # The rendezvous store lives here, as torchrun's agent hosts it, so that no worker's exit
    # can take it from the others while they leave their group (workers connect as clients).
    # The workers wait for it: one that finds no store yet retries after a back-off of about
    # half a second (measured), against 10 ms to join a group whose store is up.
    try:
        store = TCPStore("127.0.0.1", port, count, is_master=True, wait_for_workers=False)
    except BaseException:  # the port was taken meanwhile: no worker may wait for it forever
        for worker in workers:
            worker.kill()
        raise
    store_up.set()
    try:
        _supervise(workers, destination, started)
    except KeyboardInterrupt:  # the workers got the interrupt too, and unwind themselves
        for worker in workers:
            worker.join()
    for worker in workers:
        worker.join()
    del store
    codes = [w.exitcode if w.exitcode is not None else 1 for w in workers]
    for rank, code in enumerate(codes):
        if code < 0:  # not an error the workers agreed on: the process itself died
            name = signal.Signals(-code).name
            print(
                f"codegen convert: error: worker {rank} of {count} died ({name})", file=sys.stderr
            )
    codes = [128 - c if c < 0 else c for c in codes]  # killed by a signal: 128 + its number
    if codes[0]:
        return codes[0]
    return next((c for c in codes if c), 0)


def _supervise(workers: list[BaseProcess], destination: Path, started: float) -> None:
    """Wait until every worker has exited; once one has failed, give the others `GRACE_S` to
    stop by themselves, then kill them and remove the staging folder."""
    failed_at = None
    # The workers still running are listed once per turn and waited on: listing them again for
    # the wait could find none (both exited in between), and a wait on nothing sleeps its whole
    # timeout (it cost a second of a two-worker conversion, now and then).
    while running := [w for w in workers if w.is_alive()]:
        if failed_at is None and any(w.exitcode not in (None, 0) for w in workers):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > GRACE_S:
            for worker in running:
                worker.kill()
            _remove_staging(destination, since=started)
        wait([w.sentinel for w in running], timeout=1.0)  # until one exits


def _worker(argv: list[str], rank: int, count: int, port: int, store_up: Event) -> None:
    store_up.wait()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(count),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the launcher hosts the store (see run_workers)
    )
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // count))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from qwen35_codegen.cli.main import main

    sys.exit(main(argv))


def _remove_staging(destination: Path, *, since: float) -> None:
    """The hidden staging folders of this run (made since it started) beside `destination`."""
    for folder in destination.parent.glob(f".{destination.name}.partial-*"):
        if folder.is_dir() and folder.stat().st_mtime >= since - 1:
            shutil.rmtree(folder, ignore_errors=True)
