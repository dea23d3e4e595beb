"""Megatron model parallelism over gloo: in-process (world size 1) or in spawned CPU ranks.

Conversions and their tests must run tensor, pipeline and expert parallel layouts on machines
without GPUs; gloo is the backend that exists everywhere. ``run_ranks`` is the test harness: it
spawns the ranks, and any rank's exception comes back to the parent with its traceback.
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

from codegen.runtime.megatron_shims import install_cpu_shims

#: Collectives give up after this long, so a rank that died cannot hang the others forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=2)

_owns_process_group = False


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    *,
    sequence_parallel: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """Initialise Megatron's parallel state (and a world-size-1 gloo group if none exists).

    Returns the matching ``TransformerConfig`` keyword arguments, so the model's config and the
    process groups cannot disagree.
    """
    global _owns_process_group
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tp > 1")
    install_cpu_shims()
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group(
            "gloo", store=store, rank=0, world_size=1, timeout=COLLECTIVE_TIMEOUT
        )
        _owns_process_group = True
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
    )
    seed_rng_tracker(seed)
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "sequence_parallel": sequence_parallel,
    }


def seed_rng_tracker(seed: int) -> None:
    """Give Megatron's RNG tracker the states it forks (as ``model_parallel_cuda_manual_seed``).

    With the CPU backend (no Transformer Engine) the tracker holds CPU generator states, as the
    stand-ins in ``megatron_shims`` expect, CUDA or not.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import random

    if not install_cpu_shims():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    seeds = {
        random._MODEL_PARALLEL_RNG_TRACKER_NAME: seed + 2718 + tp_rank,
        random.get_data_parallel_rng_tracker_name(): seed,
        random.get_expert_parallel_rng_tracker_name(): seed + 1024 + 100 * ep_rank + etp_rank,
    }
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    tracker.set_states(
        {name: torch.Generator().manual_seed(value).get_state() for name, value in seeds.items()}
    )


def destroy_parallel() -> None:
    """Undo ``init_parallel``: parallel state, RNG tracker, and the group it created, if any."""
    global _owns_process_group
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    tensor_parallel.get_cuda_rng_tracker().reset()
    if _owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_process_group = False


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
