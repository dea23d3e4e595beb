"""Spawned gloo ranks on one machine: ``run_ranks(fn, n, *args)`` runs ``fn`` in ``n`` processes
joined in one process group, and any rank's exception comes back to the caller with its
traceback. Tests use it for tensor, pipeline and expert parallel layouts on machines without GPUs.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen35_bridge.megatron.parallel import COLLECTIVE_TIMEOUT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    results: mp.Queue,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """Body of one spawned rank: join the gloo group, run ``fn``, report result or traceback."""
    # Ranks share the machine's cores; oversubscribed intra-op threads slow every collective.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        # Plain pickle bytes: torch's queue would pass tensors as shared-memory handles, which die
        # with this process if it exits before the parent has read them.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600.0
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned gloo ranks; return results indexed by rank.

    ``fn`` must be importable (module level) and its result picklable; inside, the default
    process group is ready and ``fn`` calls ``init_parallel`` itself. Raises RuntimeError with
    every failing rank's traceback, or naming ranks that died or did not finish.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = []
    for rank in range(world_size):
        # Not daemonic: ranks may start processes themselves (dist_checkpointing's writer does).
        process = context.Process(
            target=_rank_main,
            args=(rank, world_size, port, results, fn, args),
            daemon=False,
        )
        process.start()
        processes.append(process)
    try:
        outcomes = _collect(results, processes, timeout_s)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return _results_or_raise(outcomes, world_size)


def _collect(
    results: mp.Queue, processes: list[mp.Process], timeout_s: float
) -> dict[int, tuple[bool, Any]]:
    """Gather ``(ok, value)`` per rank until all report, one fails, one dies, or time is up."""
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while len(outcomes) < len(processes) and datetime.datetime.now() < deadline:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(processes) if not p.is_alive() and r not in outcomes]
            if dead and results.empty():
                break
            continue
        outcomes[rank] = (ok, value)
        if not ok:
            _drain(results, outcomes, grace_s=2.0)
            break
    return outcomes


def _drain(results: mp.Queue, outcomes: dict[int, tuple[bool, Any]], grace_s: float) -> None:
    """After a failure, keep what other ranks report shortly after (often the same error)."""
    try:
        while True:
            rank, ok, value = results.get(timeout=grace_s)
            outcomes[rank] = (ok, value)
    except queue.Empty:
        pass


def _results_or_raise(outcomes: dict[int, tuple[bool, Any]], world_size: int) -> list[Any]:
    failures = [
        f"--- rank {rank} ---\n{value}" for rank, (ok, value) in sorted(outcomes.items()) if not ok
    ]
    missing = [rank for rank in range(world_size) if rank not in outcomes]
    if failures or missing:
        message = "\n".join(failures)
        if missing:
            message += f"\nranks {missing} did not report (died, hung or were stopped)"
        raise RuntimeError(f"run_ranks({world_size}) failed:\n{message}")
    return [pickle.loads(outcomes[rank][1]) for rank in range(world_size)]
