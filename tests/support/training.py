"""A trainer's checkpoint, made as Megatron-LM makes one: a model in megatron-core's DDP, one step
of megatron-core's own optimizer, and `dist_checkpointing.save` of the model's and the optimizer's
sharded state dicts into a run root with its tracker.

CPU note: megatron-core 0.19.2's optimizer allocates a few scalars with an explicit
`device="cuda"` (`FP32Optimizer._scale`, the grad-norm accumulator in `clip_grads`), and DDP's grad
sync asks for CUDA streams. `cuda_factories_on_cpu` answers the first for the optimizer's calls
only; the second is skipped (data-parallel size 1: the backward hooks already fill `main_grad`);
gradient clipping is off (it asserts CUDA tensors).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

FACTORIES = ("tensor", "zeros", "ones", "empty", "full")
ITERATION = 1


@contextmanager
def cuda_factories_on_cpu() -> Iterator[None]:
    """torch's tensor factories, with `device="cuda"` answered on the CPU, for the block only."""
    real = {name: getattr(torch, name) for name in FACTORIES}

    def on_cpu(factory):
        def make(*args, device=None, **kwargs):
            cuda = device is not None and str(device).startswith("cuda")
            return factory(*args, device="cpu" if cuda else device, **kwargs)

        return make

    for name, factory in real.items():
        setattr(torch, name, on_cpu(factory))
    try:
        yield
    finally:
        for name, factory in real.items():
            setattr(torch, name, factory)


def train_and_save_on_rank(
    hf_dir: Path,
    bridge_dir: Path,
    run_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    drop: str | None = None,
) -> dict | None:
    """Load the HF checkpoint, take one optimizer step, save the run (tracker + iter_0000001).
    Returns, on rank 0, the trained weights under HF names (numpy, for the results queue).
    `drop`: leave the model tensors whose key contains this out of the save (a broken run)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from qwen35_bridge.formats.megatron_lm import TRACKER_NAME, iteration_folder
    from qwen35_bridge.mapping.kinds import ConvertOptions
    from qwen35_bridge.megatron.parallel import destroy_parallel, init_parallel
    from qwen35_codegen.registry.lookup import bridge_for_checkpoint

    bridge, spec, _ = bridge_for_checkpoint(Path(hf_dir), bridge_dir=Path(bridge_dir), quiet=True)
    # megatron-core refuses to train MoE under TP without sequence parallelism.
    parallel = init_parallel(tp, pp, ep, sequence_parallel=tp > 1)
    try:
        model = bridge.build_model(**parallel)
        bridge.load_hf(model, hf_dir)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, bf16=False, fp16=False)
        with cuda_factories_on_cpu():
            optimizer = get_megatron_optimizer(config, [ddp])
        ids = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
        if pp > 1:
            raise NotImplementedError("one optimizer step under PP needs the pipeline schedule")
        loss = ddp(
            input_ids=ids, position_ids=torch.arange(32)[None], attention_mask=None, labels=ids
        )
        loss.float().mean().backward()
        with cuda_factories_on_cpu():
            stepped, _norm, _zeros = optimizer.step()
        assert stepped, "the optimizer step was skipped"
        model_state = model.sharded_state_dict()
        state = {
            "model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state),
            "iteration": ITERATION,
            "checkpoint_version": 3.0,
        }
        if drop is not None:
            state["model"] = {k: v for k, v in model_state.items() if drop not in k}
        folder = Path(run_dir) / iteration_folder(ITERATION)
        if dist.get_rank() == 0:
            folder.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(state, str(folder))
        if dist.get_rank() == 0:
            (Path(run_dir) / TRACKER_NAME).write_text(f"{ITERATION}\n")
        # A trained GDN norm g rarely has an exact g + 1 in fp32: the export must accept it.
        trained = bridge.export_hf(model, options=ConvertOptions(allow_norm_rounding=True))
        rank = dist.get_rank()
    finally:
        destroy_parallel()
    return {k: v.numpy() for k, v in trained.items()} if rank == 0 else None
