"""Megatron's parallel state for a bridge's model: in-process (a world-size-1 gloo group when no
process group exists) or on the ranks of an existing group (torchrun, `ranks.run_ranks`).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

from qwen35_bridge.megatron.shims import install_cpu_shims

#: Collectives give up after this long, so a rank that died cannot hang the others forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=2)

_owns_process_group = False


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    *,
    vpp: int | None = None,
    sequence_parallel: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """Initialise Megatron's parallel state (and a world-size-1 gloo group if none exists).

    Returns the matching ``TransformerConfig`` keyword arguments, so the model's config and the
    process groups cannot disagree. With `vpp` (virtual pipeline chunks per stage), a bridge's
    `build_model` returns the list of this stage's chunks.
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
        virtual_pipeline_model_parallel_size=vpp,
    )
    seed_rng_tracker(seed)
    return {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "expert_model_parallel_size": ep,
        "sequence_parallel": sequence_parallel,
        **({"virtual_pipeline_model_parallel_size": vpp} if vpp else {}),
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
